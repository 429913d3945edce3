"""A 3-node Ray cluster on this machine (ray.cluster_utils.Cluster): losing a node mid-run.

Slow (three raylets on a small machine); run with ``-m slow``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from clipscope.cluster.runtime import cluster_nodes, ray_runtime, require_shared_store
from clipscope.cluster.shard_pool import run_shards
from clipscope.errors import ConfigError

N_TASKS = 12
ROWS = 2


@dataclass(frozen=True)
class Shard:
    index: int
    weight: int = ROWS


class SlowWriter:
    """Writes its task's rows into a memmap that every "node" sees (they share this machine's disk)."""

    def __init__(self, path: str):
        self.out = np.lib.format.open_memmap(path, mode="r+")

    def process(self, task: Shard) -> dict:
        import ray

        time.sleep(0.6)
        self.out[task.index * ROWS : (task.index + 1) * ROWS] = task.index + 1
        self.out.flush()
        return {"count": ROWS, "node_id": ray.get_runtime_context().get_node_id()}


@dataclass(frozen=True)
class SlowWriterFactory:
    path: str

    def __call__(self) -> SlowWriter:
        return SlowWriter(self.path)


@pytest.mark.slow
def test_run_completes_on_the_other_nodes_when_a_node_is_removed(tmp_path: Path, monkeypatch):
    import ray
    from ray import cloudpickle
    from ray.cluster_utils import Cluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    out_path = tmp_path / "out.npy"
    out = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=(N_TASKS * ROWS,))
    out[:] = 0
    out.flush()

    # Fast node-death detection, so the lost node's actor is declared dead within seconds.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3},
        },
    )
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        with ray_runtime(address=cluster.address) as rt:
            assert rt.mode == "cluster"
            assert len(cluster_nodes()) == 3
            with pytest.raises(ConfigError, match="has 3 alive nodes"):
                require_shared_store(tmp_path)
            require_shared_store(tmp_path, allow_local=True)

            driver_raylet = ray._private.worker.global_worker.node._raylet_socket_name
            victim = next(node for node in workers if node._raylet_socket_name != driver_raylet)
            victim_id = victim.node_id
            finished: list[tuple[int, str]] = []
            failures: list = []
            removed_after: list[int] = []

            def on_result(task: Shard, result: dict) -> None:
                finished.append((task.index, result["node_id"]))
                # Remove the victim right after its first result: it holds its next task by then.
                if result["node_id"] == victim_id and not removed_after:
                    removed_after.append(len(finished))
                    cluster.remove_node(victim)

            summary = run_shards(
                [Shard(index) for index in range(N_TASKS)],
                SlowWriterFactory(str(out_path)),
                num_workers=3,
                on_result=on_result,
                on_failure=lambda task, message: failures.append((task.index, message)),
                poll_s=0.2,
            )
            alive_after = len(cluster_nodes())
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        cluster.shutdown()

    assert failures == []
    assert sorted(index for index, _ in finished) == list(range(N_TASKS))
    assert summary.done == N_TASKS and summary.failed == 0
    assert summary.actors_lost == 1 and summary.retried >= 1
    assert alive_after == 2
    # The victim finished one task, was removed with more in hand, and the others finished the rest.
    assert removed_after and [node_id for _, node_id in finished].count(victim_id) == 1
    np.testing.assert_array_equal(np.load(out_path), np.repeat(np.arange(1, N_TASKS + 1, dtype=np.float32), ROWS))
