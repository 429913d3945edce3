"""`run_extract` on Ray: the same store as the in-process run, a killed actor's shard retried, a shard
that always fails recorded and retried on demand, and (slow) a node lost from a 3-node cluster.

Store equality is strict: every array's dtype, shape and bytes, the sample index, the store's
attributes and the done records (counts, checksums) match the in-process run's. The driver computes
with one torch thread; Ray starts each 1-CPU actor with OMP_NUM_THREADS=1, so both sides run the
same single-threaded kernels and the floats agree bit for bit.
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from PIL import Image

from clipscope.cluster.runtime import cluster_nodes, ray_runtime
from clipscope.errors import ConfigError, DataError
from clipscope.pipelines.cli import main as cli_main
from clipscope.pipelines.jobs.extract.job import ShardExtractor, ShardTask, run_extract
from clipscope.pipelines.jobs.extract.settings import ExtractConfig
from clipscope.pipelines.data.webdataset_input import write_shard
from clipscope.storage.status import store_status
from clipscope.storage.store import RunStore

MODEL = "clipscope-tiny"
ROWS_PER_CHUNK = 4
# 7 samples → two 4-row chunks, so a crash can leave half a shard written.
SHARD_COUNTS = (5, 7, 6, 3)
CORRUPT = {(2, 1)}  # (shard, sample) with garbage image bytes
CRASH_SHARD = 1
BROKEN_SHARD = 2
DONE_KEYS = ("count", "valid", "errors", "start", "capacity", "checksum", "shard_errors", "url")


# ----------------------------------------------------------------------------------------------
# Data, configs and store comparison


def image_bytes(rng: np.random.Generator) -> bytes:
    h, w = int(rng.integers(20, 80)), int(rng.integers(20, 80))
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(folder: Path, counts=SHARD_COUNTS, corrupt=CORRUPT, seed: int = 3) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for s, count in enumerate(counts):
        samples = [{"__key__": f"s{s}-{i:03d}",
                    "png": b"not a PNG" if (s, i) in corrupt else image_bytes(rng),
                    "cls": int(rng.integers(0, 100)), "txt": f"caption {s}-{i}"} for i in range(count)]
        path = str(folder / f"shard-{s:03d}.tar")
        write_shard(path, samples)
        paths.append(path)
    return paths


def make_config(data, out, **overrides) -> ExtractConfig:
    """A tiny-model run storing every kind of array (second-order and token terms included)."""
    options = dict(data=tuple(data), out=str(out), model=MODEL, rows_per_chunk=ROWS_PER_CHUNK, batch_size=4,
                   second_order_layers=(1,), token_layers=(3,), device="cpu")
    return ExtractConfig(**{**options, **overrides})


def arrays_of(url: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(url, mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        members = [(name, node) for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array)]
    return {name: np.asarray(node[...]) for name, node in members}


def records_of(url: str, status: str = "done") -> dict[int, dict]:
    records = RunStore.open(url, "r").shard_records(stage="extract")
    return {index: record for index, record in records.items() if record["status"] == status}


def assert_same_store(url: str, reference: str) -> None:
    """Same arrays (dtype, shape, bytes), sample index, attributes and done records."""
    got, want = arrays_of(url), arrays_of(reference)
    assert sorted(got) == sorted(want)
    for name, expected in want.items():
        assert got[name].dtype == expected.dtype and got[name].shape == expected.shape, name
        assert got[name].tobytes() == expected.tobytes(), f"{name} differs from the reference"
    assert pq.read_table(os.path.join(url, "samples.parquet")).equals(
        pq.read_table(os.path.join(reference, "samples.parquet")))
    assert zarr.open_group(url, mode="r").attrs.asdict() == zarr.open_group(reference, mode="r").attrs.asdict()
    mine, theirs = records_of(url), records_of(reference)
    assert sorted(mine) == sorted(theirs)
    for index, record in theirs.items():
        assert {k: mine[index][k] for k in DONE_KEYS} == {k: record[k] for k in DONE_KEYS}, index
    assert not os.path.exists(os.path.join(url, "lock.json"))


# ----------------------------------------------------------------------------------------------
# Extractors that misbehave (pickled by value to the actors: see the embedded_ray fixture)


class CrashOnceExtractor(ShardExtractor):
    """On the first attempt at CRASH_SHARD: garbage into the shard's first chunk, then the actor
    process dies. The attempt is claimed with a marker file next to the store holding the pid."""

    def process(self, task: ShardTask) -> dict:
        if task.index == CRASH_SHARD:
            try:
                with open(Path(self.config.out).parent / "crashed", "x") as marker:
                    marker.write(str(os.getpid()))
            except FileExistsError:
                pass
            else:
                garbage = {name: np.full((ROWS_PER_CHUNK, *self.store.array(name).shape[1:]), 7.0, np.float32)
                           for name in self.store.array_names(per_sample=True) if name != "valid"}
                self.store.write_rows(task.start, garbage, np.ones(ROWS_PER_CHUNK, bool))
                os._exit(1)
        return {**super().process(task), "pid": os.getpid()}


class UnreadableShardExtractor(ShardExtractor):
    """BROKEN_SHARD fails on every attempt, as an unreadable shard does."""

    def process(self, task: ShardTask) -> dict:
        if task.index == BROKEN_SHARD:
            raise DataError(f"unreadable shard {task.url}: I/O error")
        return super().process(task)


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_shards(tmp_path_factory.mktemp("ray-shards"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards, one_thread) -> str:
    """The in-process (no Ray) run of the shards: what every Ray run must reproduce."""
    out = tmp_path_factory.mktemp("ray-reference") / "local.zarr"
    summary = run_extract(make_config(shards, out), progress_display="off")
    assert summary.ok and summary.done == len(SHARD_COUNTS)
    return str(out)


@pytest.fixture
def no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


# ----------------------------------------------------------------------------------------------
# Embedded Ray (2 CPUs) shared by the class: class scoped, not module scoped, so that it is shut down
# before the slow test below builds its own cluster in this process.


@pytest.fixture(scope="class")
def embedded_ray():
    """An embedded 2-CPU Ray; this module's extractor classes are pickled by value to the actors."""
    from ray import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        with ray_runtime(num_cpus=2, object_store_memory=200 * 1024 * 1024) as runtime:
            yield runtime
    finally:
        cloudpickle.unregister_pickle_by_value(module)


@pytest.mark.usefixtures("embedded_ray", "no_ray_address")
class TestEmbeddedRay:
    def test_ray_run_writes_the_in_process_store(self, reference, shards, tmp_path):
        config = make_config(shards, tmp_path / "ray.zarr", workers=2)
        assert config.uses_ray
        summary = run_extract(config, progress_display="off")
        assert summary.ok and (summary.done, summary.skipped) == (len(SHARD_COUNTS), 0)
        assert summary.images == sum(SHARD_COUNTS)
        assert_same_store(config.out, reference)

    def test_a_shard_whose_actor_dies_mid_write_is_rewritten_by_another(self, reference, shards, tmp_path):
        config = make_config(shards, tmp_path / "crash.zarr", workers=2)
        summary = run_extract(config, progress_display="off", extractor_class=CrashOnceExtractor)
        crashed_pid = int((tmp_path / "crashed").read_text())
        assert summary.ok and summary.done == len(SHARD_COUNTS)
        done = records_of(config.out)
        assert sorted(done) == list(range(len(SHARD_COUNTS)))
        assert done[CRASH_SHARD]["pid"] != crashed_pid
        assert_same_store(config.out, reference)

    def test_a_shard_failing_every_attempt_is_recorded_skipped_and_retried_on_demand(self, reference, shards,
                                                                                     tmp_path):
        config = make_config(shards, tmp_path / "broken.zarr", workers=2)
        summary = run_extract(config, progress_display="off", extractor_class=UnreadableShardExtractor)
        others = sorted(set(range(len(SHARD_COUNTS))) - {BROKEN_SHARD})
        assert not summary.ok and summary.done == len(others)
        [(index, error)] = summary.failed
        assert index == BROKEN_SHARD and error.startswith("failed after 3 attempt(s)")
        assert f"DataError: unreadable shard {shards[BROKEN_SHARD]}" in error
        status = store_status(config.out)["stages"]["extract"]
        assert status["failed"] == [{"index": BROKEN_SHARD, "url": shards[BROKEN_SHARD], "error": error}]
        assert status["done"] == len(others) and status["pending"] == []
        assert sorted(records_of(config.out)) == others

        # Without retry_failed the failed shard is skipped, even with a healthy extractor: still not ok.
        again = run_extract(config, progress_display="off")
        assert (again.done, again.skipped, again.failed, again.ok) == (0, len(others), [(BROKEN_SHARD, error)], False)
        assert store_status(config.out)["stages"]["extract"]["failed"] == status["failed"]

        retried = run_extract(make_config(shards, config.out, workers=2, retry_failed=True), progress_display="off")
        assert (retried.done, retried.skipped, retried.failed, retried.ok) == (1, len(others), [], True)
        assert store_status(config.out)["stages"]["extract"]["failed"] == []
        assert_same_store(config.out, reference)

    def test_cli_exits_1_when_a_shard_read_on_a_worker_fails(self, shards, tmp_path, capsys):
        # A `pipe:` shard whose command succeeds once (the driver's planning scan) and fails ever
        # after (each read on a worker): a download that broke between planning and extraction.
        flaky = f"pipe:if mkdir {tmp_path / 'fetched-once'} 2>/dev/null; then cat {shards[0]}; else exit 3; fi"
        out = tmp_path / "cli.zarr"
        code = cli_main(["extract", shards[3], flaky, "--out", str(out), "--model", MODEL, "--workers", "2",
                         "--rows-per-chunk", str(ROWS_PER_CHUNK), "--batch-size", "4", "--progress", "off"])
        printed = capsys.readouterr().out
        assert code == 1, printed
        assert "1 shards extracted, 0 already done, 1 failed" in printed
        assert (f"failed shard 1: failed after 3 attempt(s); last error: DataError: {flaky} exited with status 3"
                in printed)
        status = store_status(str(out))["stages"]["extract"]
        assert [f["index"] for f in status["failed"]] == [1] and status["done"] == 1


# ----------------------------------------------------------------------------------------------
# A 3-node cluster on this machine (slow: three raylets on a small machine)

NODE_LOSS_COUNTS = (3,) * 9
N_NODES = 3
VICTIM_WAIT_S = 120.0
# After all actors are up, a shard takes at least this long: time for the driver to hand every
# actor its second shard before any actor finishes its first.
SHARD_MIN_S = 0.5


class LoseANodeExtractor(ShardExtractor):
    """Every actor starts work only once all N_NODES actors are built (a `ready-PID` file each), so
    each holds two shards. The first worker (non-head) node to finish a shard becomes the victim:
    its node id goes into the file `victim` next to the store, and its next shard waits there
    (leaving a `stalled-INDEX` file) until the test removes the node. Done records carry the node id."""

    def __init__(self, config: ExtractConfig, loaded=None):
        super().__init__(config, loaded)
        self.signals = Path(config.out).parent
        (self.signals / f"ready-{os.getpid()}").touch()

    def process(self, task: ShardTask) -> dict:
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        victim = self.signals / "victim"
        if victim.exists() and victim.read_text() == node_id:
            (self.signals / f"stalled-{task.index}").touch()
            time.sleep(VICTIM_WAIT_S)
            raise RuntimeError(f"node {node_id} was not removed within {VICTIM_WAIT_S:g}s")
        deadline = time.monotonic() + VICTIM_WAIT_S
        while len(list(self.signals.glob("ready-*"))) < N_NODES and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(SHARD_MIN_S)
        record = super().process(task)
        on_head = any(node["NodeID"] == node_id and "node:__internal_head__" in node["Resources"]
                      for node in ray.nodes())
        if not on_head:
            claim = self.signals / f"victim-{node_id}"
            claim.write_text(node_id)
            try:
                os.link(claim, victim)  # atomic: the first node to get here is the victim
            except FileExistsError:
                pass
        return {**record, "node_id": node_id}


@pytest.mark.slow
def test_extraction_survives_losing_a_node_of_a_three_node_cluster(tmp_path, one_thread, no_ray_address):
    import ray
    from ray import cloudpickle
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    data = write_shards(tmp_path / "shards", NODE_LOSS_COUNTS, corrupt={(4, 0)}, seed=9)
    reference = make_config(data, tmp_path / "reference" / "local.zarr")
    assert run_extract(reference, progress_display="off").ok
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = make_config(data, run_dir / "ray.zarr", workers=N_NODES, allow_local_store=True)

    # Fast node-death detection, so the removed node's actor is declared dead within seconds.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
    workers = [cluster.add_node(num_cpus=1) for _ in range(N_NODES - 1)]
    cluster.wait_for_nodes()
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    stop = threading.Event()
    removed: list[str] = []

    def remove_the_victim() -> None:
        deadline = time.monotonic() + VICTIM_WAIT_S
        while not stop.is_set() and time.monotonic() < deadline:
            if (run_dir / "victim").exists():
                node_id = (run_dir / "victim").read_text()
                cluster.remove_node(next(node for node in workers if node.node_id == node_id))
                removed.append(node_id)
                return
            time.sleep(0.05)

    remover = threading.Thread(target=remove_the_victim, daemon=True)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        assert len(cluster_nodes()) == N_NODES
        # A local path on a multi-node cluster is refused unless declared shared; nothing is written.
        with pytest.raises(ConfigError, match=f"local path but the Ray cluster has {N_NODES} alive nodes"):
            run_extract(make_config(data, run_dir / "ray.zarr", workers=N_NODES), progress_display="off")
        assert not (run_dir / "ray.zarr").exists()

        remover.start()
        summary = run_extract(config, progress_display="off", extractor_class=LoseANodeExtractor)
        remover.join(timeout=VICTIM_WAIT_S)
        alive_after = len(cluster_nodes())
    finally:
        stop.set()
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(module)
        cluster.shutdown()

    assert removed and alive_after == N_NODES - 1
    assert summary.ok and summary.done == len(NODE_LOSS_COUNTS)
    node_of = {index: record["node_id"] for index, record in records_of(config.out).items()}
    # The victim finished one shard; what it held when it was removed was finished elsewhere.
    assert list(node_of.values()).count(removed[0]) == 1
    stalled = [int(path.name.split("-")[1]) for path in run_dir.glob("stalled-*")]
    assert stalled and all(node_of[index] != removed[0] for index in stalled)
    assert_same_store(config.out, reference.out)
