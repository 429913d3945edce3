"""run_shards on an embedded 2-CPU Ray: exactly-once results, retries after a killed actor, failures.

The dummy workers stand in for the extraction job: each task owns a block of rows in a numpy memmap
(the "store") and writes them itself; every execution also drops a file, so the tests can count how
often each task really ran.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from clipscope.cluster.progress import Progress
from clipscope.cluster.shard_pool import PoolSummary, WorkerStartupError, run_shards
from clipscope.errors import ConfigError

ROWS_PER_TASK = 4
WIDTH = 3


@dataclass(frozen=True)
class Shard:
    index: int
    weight: int


def expected_rows(index: int) -> np.ndarray:
    rows = np.arange(ROWS_PER_TASK * WIDTH, dtype=np.float32).reshape(ROWS_PER_TASK, WIDTH)
    return rows + 100.0 * index


class MemmapWorker:
    """Writes a task's rows into the shared memmap; misbehaves on the tasks it is told to."""

    def __init__(self, root: str, crash_once: int | None, crash_always: int | None, always_raise: int | None):
        self.root = Path(root)
        self.out = np.lib.format.open_memmap(self.root / "out.npy", mode="r+")
        self.crash_once = crash_once
        self.crash_always = crash_always
        self.always_raise = always_raise

    def process(self, task: Shard) -> dict:
        (self.root / "runs" / f"{task.index}-{uuid.uuid4().hex}").touch()
        start = task.index * ROWS_PER_TASK
        # Half the rows first: a crash below leaves a partially written task, as in real life.
        self.out[start : start + 2] = expected_rows(task.index)[:2]
        if task.index == self.crash_once:
            marker = self.root / f"crashed-{task.index}"
            if not marker.exists():
                marker.touch()
                os._exit(1)
        if task.index == self.crash_always:
            os._exit(1)
        if task.index == self.always_raise:
            raise ValueError(f"bad shard {task.index}")
        self.out[start : start + ROWS_PER_TASK] = expected_rows(task.index)
        self.out.flush()
        return {"count": task.weight - 1, "pid": os.getpid()}


@dataclass(frozen=True)
class MemmapWorkerFactory:
    root: str
    crash_once: int | None = None
    crash_always: int | None = None
    always_raise: int | None = None

    def __call__(self) -> MemmapWorker:
        return MemmapWorker(self.root, self.crash_once, self.crash_always, self.always_raise)


class BrokenFactory:
    def __call__(self):
        raise RuntimeError("model weights not found")


def make_store(tmp_path: Path, n_tasks: int) -> np.ndarray:
    (tmp_path / "runs").mkdir()
    out = np.lib.format.open_memmap(
        tmp_path / "out.npy", mode="w+", dtype=np.float32, shape=(n_tasks * ROWS_PER_TASK, WIDTH)
    )
    out[:] = np.nan
    out.flush()
    return out


def runs_per_task(tmp_path: Path, n_tasks: int) -> list[int]:
    counts = [0] * n_tasks
    for entry in (tmp_path / "runs").iterdir():
        counts[int(entry.name.split("-")[0])] += 1
    return counts


def run(
    tmp_path: Path, n_tasks: int, *, in_flight: int = 2, max_attempts: int = 3, **factory_args
) -> tuple[PoolSummary, list, list, Progress]:
    make_store(tmp_path, n_tasks)
    results: list = []
    failures: list = []
    progress = Progress(display="off")
    summary = run_shards(
        [Shard(index, weight=10 + index) for index in range(n_tasks)],
        MemmapWorkerFactory(str(tmp_path), **factory_args),
        num_workers=2,
        max_attempts=max_attempts,
        max_in_flight_per_worker=in_flight,
        on_result=lambda task, result: results.append((task.index, result)),
        on_failure=lambda task, message: failures.append((task.index, message)),
        progress=progress,
        poll_s=0.2,
    )
    return summary, results, failures, progress


def stored(tmp_path: Path) -> np.ndarray:
    return np.load(tmp_path / "out.npy")


def test_every_task_finishes_once_and_writes_its_rows(ray_local, tmp_path):
    n_tasks = 10
    summary, results, failures, progress = run(tmp_path, n_tasks)

    assert sorted(index for index, _ in results) == list(range(n_tasks))
    assert failures == []
    assert runs_per_task(tmp_path, n_tasks) == [1] * n_tasks
    np.testing.assert_array_equal(stored(tmp_path), np.concatenate([expected_rows(i) for i in range(n_tasks)]))
    assert (summary.done, summary.failed, summary.retried, summary.actors_lost) == (n_tasks, 0, 0, 0)
    assert summary.actors_started == 2
    # Items are the counts the results reported, and the progress total follows them.
    reported = sum(10 + i - 1 for i in range(n_tasks))
    assert summary.items == reported
    snap = progress.snapshot()
    assert (snap.items_done, snap.items_total, snap.tasks_done, snap.tasks_total) == (
        reported,
        reported,
        n_tasks,
        n_tasks,
    )


@pytest.mark.parametrize("in_flight", [1, 2])
def test_task_of_a_killed_actor_is_retried_and_output_is_identical(ray_local, tmp_path, in_flight):
    n_tasks = 8
    summary, results, failures, _ = run(tmp_path, n_tasks, in_flight=in_flight, crash_once=3)

    assert sorted(index for index, _ in results) == list(range(n_tasks))
    assert failures == []
    np.testing.assert_array_equal(stored(tmp_path), np.concatenate([expected_rows(i) for i in range(n_tasks)]))
    assert summary.done == n_tasks and summary.failed == 0
    assert summary.actors_lost == 1 and summary.actors_started == 3
    assert summary.retried >= 1
    runs = runs_per_task(tmp_path, n_tasks)
    assert runs[3] == 2
    if in_flight == 1:
        # The driver had every earlier reply before handing task 3 over: nothing else reran.
        assert runs == [1, 1, 1, 2, 1, 1, 1, 1]
    else:
        # The task finished just before the crash may rerun (its reply can die with the process).
        assert sum(runs) <= n_tasks + 2


def test_task_that_kills_every_actor_is_reported_after_max_attempts(ray_local, tmp_path):
    n_tasks = 5
    summary, results, failures, progress = run(tmp_path, n_tasks, max_attempts=2, crash_always=1)

    assert sorted(index for index, _ in results) == [0, 2, 3, 4]
    assert [index for index, _ in failures] == [1]
    assert "2 attempt" in failures[0][1] and "worker actor lost" in failures[0][1]
    assert summary.done == 4 and summary.failed == 1
    # Charged only when alone on its actor: two charged deaths, plus at most one shared one.
    assert 2 <= summary.actors_lost <= 3
    expected = np.concatenate([expected_rows(i) for i in range(n_tasks)])
    got = stored(tmp_path)
    keep = np.ones(len(expected), dtype=bool)
    keep[ROWS_PER_TASK : 2 * ROWS_PER_TASK] = False
    np.testing.assert_array_equal(got[keep], expected[keep])
    assert progress.snapshot().tasks_failed == 1


def test_task_that_always_raises_is_reported_after_max_attempts(ray_local, tmp_path):
    n_tasks = 6
    summary, results, failures, progress = run(tmp_path, n_tasks, always_raise=2)

    assert sorted(index for index, _ in results) == [0, 1, 3, 4, 5]
    assert len(failures) == 1
    failed_index, message = failures[0]
    assert failed_index == 2
    assert "ValueError: bad shard 2" in message and "3 attempt" in message
    assert runs_per_task(tmp_path, n_tasks)[2] == 3
    assert (summary.done, summary.failed, summary.retried, summary.actors_lost) == (5, 1, 2, 0)
    snap = progress.snapshot()
    assert snap.tasks_failed == 1 and snap.retries == 2
    # The failed task's expected items left the total: what remains is exactly what was done.
    assert snap.items_total == snap.items_done == sum(10 + i - 1 for i in (0, 1, 3, 4, 5))


def test_factory_failing_in_every_actor_raises(ray_local):
    with pytest.raises(WorkerStartupError, match="model weights not found"):
        run_shards(
            [Shard(0, 1), Shard(1, 1)],
            BrokenFactory(),
            num_workers=2,
            on_result=lambda task, result: None,
            on_failure=lambda task, message: None,
            poll_s=0.2,
        )


def test_no_tasks_returns_an_empty_summary_without_actors():
    summary = run_shards([], BrokenFactory(), on_result=print, on_failure=print)
    assert (summary.done, summary.failed, summary.actors_started) == (0, 0, 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_attempts": 0}, "max_attempts must be an integer ≥ 1, got 0"),
        ({"num_workers": 0}, "num_workers must be an integer ≥ 1, got 0"),
        ({"max_in_flight_per_worker": 0}, "max_in_flight_per_worker must be an integer ≥ 1, got 0"),
        ({"max_replacements": -1}, "max_replacements must be an integer ≥ 0 or None, got -1"),
        ({"weight_of": lambda task: -3}, "task weight must be an integer ≥ 0, got -3"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        run_shards([Shard(0, 1)], BrokenFactory(), on_result=print, on_failure=print, **kwargs)


def test_gpu_pool_on_a_cluster_without_gpus_is_refused(ray_local):
    with pytest.raises(ConfigError, match="use_gpu=True but the Ray cluster has no GPUs"):
        run_shards([Shard(0, 1)], BrokenFactory(), use_gpu=True, on_result=print, on_failure=print)
