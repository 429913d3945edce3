"""The Ray pool's retry policy is the in-process one: an error that says retrying
cannot help fails its task after one attempt; an `EnvironmentFault` stops the whole run."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from clipscope.cluster.shard_pool import run_shards
from clipscope.errors import DataError, EnvironmentFault


class Hopeless(DataError):
    retryable = False


@dataclass(frozen=True)
class Task:
    index: int
    weight: int = 1


@dataclass(frozen=True)
class CountingFactory:
    """Each execution drops a file; task 1 raises the configured error."""

    root: str
    error: str

    def __call__(self):
        return CountingWorker(Path(self.root), self.error)


class CountingWorker:
    def __init__(self, root: Path, error: str):
        self.root, self.error = root, error

    def process(self, task: Task) -> dict:
        (self.root / f"{task.index}-{uuid.uuid4().hex}").touch()
        if task.index == 1:
            raise Hopeless("not a tar") if self.error == "hopeless" else EnvironmentFault("disk full")
        return {"count": 1}


def runs_of(root: Path, index: int) -> int:
    return sum(1 for name in os.listdir(root) if name.startswith(f"{index}-"))


def test_a_hopeless_task_is_tried_once(ray_local, tmp_path):
    failures = []
    summary = run_shards([Task(0), Task(1), Task(2)], CountingFactory(str(tmp_path), "hopeless"), num_workers=2,
                         on_result=lambda task, result: None,
                         on_failure=lambda task, error: failures.append((task.index, error)), poll_s=0.2)
    assert (summary.done, summary.failed, summary.retried) == (2, 1, 0)
    assert failures == [(1, "not a tar")] and runs_of(tmp_path, 1) == 1


def test_an_environment_fault_stops_the_run(ray_local, tmp_path):
    with pytest.raises(EnvironmentFault, match="disk full"):
        run_shards([Task(0), Task(1), Task(2)], CountingFactory(str(tmp_path), "environment"), num_workers=1,
                   on_result=lambda task, result: None, on_failure=lambda task, error: None, poll_s=0.2)
    assert runs_of(tmp_path, 1) == 1
