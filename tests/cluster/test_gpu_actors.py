"""One extraction actor per GPU: the pool asks Ray for `num_gpus=1` per actor and starts as many
actors as the cluster has GPUs; `clipscope extract --device auto` on a Ray whose nodes declare
GPUs uses them. This machine has no CUDA: the embedded Ray below declares two GPUs as resources,
so each actor is scheduled on one (Ray sets its CUDA_VISIBLE_DEVICES) and computes on the CPU."""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import pytest
from PIL import Image

from clipscope.cluster import shard_pool
from clipscope.cluster.runtime import ray_runtime
from clipscope.pipelines.data.webdataset_input import write_shard
from clipscope.pipelines.jobs.extract.job import ShardExtractor, run_extract
from clipscope.pipelines.jobs.extract.settings import ExtractConfig
from clipscope.storage.store import RunStore


class FakeRay:
    """Records what the pool asks of Ray; nothing runs."""

    def __init__(self, resources):
        self.resources = resources
        self.options = None

    def put(self, value):
        return value

    def remote(self, cls):
        fake = self

        class Remote:
            def options(self, **kwargs):
                fake.options = kwargs
                return self

        return Remote()

    def is_initialized(self):
        return True

    def cluster_resources(self):
        return self.resources


def pool_with(ray, use_gpu: bool) -> shard_pool._ShardPool:
    return shard_pool._ShardPool(ray, [1, 2], [1, 1], lambda: None, num_workers=1, use_gpu=use_gpu,
                                 cpus_per_worker=1, max_attempts=3, max_in_flight=2, max_replacements=0,
                                 on_result=print, on_failure=print, count_of=lambda r: None, progress=None,
                                 startup_timeout_s=1.0, poll_s=0.1)


def test_gpu_actors_ask_for_one_gpu_each():
    ray = FakeRay({"CPU": 16, "GPU": 4})
    pool_with(ray, use_gpu=True)
    assert ray.options["num_gpus"] == 1 and ray.options["num_cpus"] == 1
    pool_with(ray, use_gpu=False)
    assert ray.options["num_gpus"] == 0


def test_one_actor_per_gpu_by_default(monkeypatch):
    started = {}

    class Recorder:
        done = failed = retried = items = actors_started = actors_lost = 0

        def __init__(self, ray, tasks, weights, factory, **kwargs):
            started.update(kwargs)

        def run(self):
            pass

        def shutdown(self):
            pass

    fake = FakeRay({"CPU": 16, "GPU": 3})
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(shard_pool, "_ShardPool", Recorder)
    shard_pool.run_shards(list(range(10)), lambda: None, use_gpu=True, on_result=print, on_failure=print)
    assert started["num_workers"] == 3 and started["use_gpu"] is True
    shard_pool.run_shards([0, 1], lambda: None, use_gpu=True, on_result=print, on_failure=print)
    assert started["num_workers"] == 2  # never more actors than shards


class GpuIdExtractor(ShardExtractor):
    """Adds the GPU ids Ray assigned to this actor to each done record."""

    def process(self, task):
        import ray

        return {**super().process(task), "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "pid": os.getpid()}


@pytest.fixture(scope="module")
def ray_with_two_gpus():
    from ray import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        with ray_runtime(num_cpus=2, num_gpus=2, object_store_memory=200 * 1024 * 1024) as runtime:
            yield runtime
    finally:
        cloudpickle.unregister_pickle_by_value(module)


def test_extract_on_a_gpu_cluster_runs_one_actor_per_gpu(ray_with_two_gpus, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rng = np.random.default_rng(0)
    paths = []
    for s in range(4):
        samples = []
        for i in range(3):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buffer, format="PNG")
            samples.append({"__key__": f"s{s}-{i}", "png": buffer.getvalue()})
        paths.append(str(tmp_path / f"shard-{s}.tar"))
        write_shard(paths[-1], samples)
    config = ExtractConfig(data=tuple(paths), out=str(tmp_path / "gpu.zarr"), model="clipscope-tiny", device="auto",
                           rows_per_chunk=4, batch_size="auto", workers=1)
    summary = run_extract(config, progress_display="off", extractor_class=GpuIdExtractor)
    assert summary.ok and summary.done == 4
    records = RunStore.open(config.out, "r").shard_records().values()
    ids = {r["pid"]: tuple(r["gpu_ids"]) for r in records}
    assert all(len(g) == 1 for g in ids.values())  # every actor holds exactly one GPU
    assert len(set(ids.values())) == len(ids) <= 2  # no GPU shared by two actors, at most one actor per GPU
