"""Store reductions (means, TextSpan statistics, TextSpan job) equal their single-process references
and do not depend on the number of Ray workers."""

import numpy as np
import pytest
import torch
from PIL import Image

from clipscope.cluster.executor import RayExecutor
from clipscope.kernels.textspan import textspan
from clipscope.pipelines.jobs.extract.job import run_extract
from clipscope.pipelines.jobs.extract.settings import ExtractConfig
from clipscope.pipelines.jobs import means as means_job, textspan as textspan_job
from clipscope.pipelines.jobs.means.job import compute_means, head_statistics
from clipscope.pipelines.jobs.means.result import mean_array_names
from clipscope.pipelines.texts.embedding_cache import cached_text_embeddings
from clipscope.pipelines.data.webdataset_input import write_shard
from clipscope.storage.store import RunStore

TEXTS = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a purple heart",
         "top left", "bottom right", "centre", "large", "small", "one shape", "two shapes", "a photo"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("reductions")
    rng = np.random.default_rng(0)
    for s, n in enumerate([9, 0, 14, 6]):
        samples = [{"__key__": f"s{s}-{i:03d}", "png": Image.fromarray(rng.integers(0, 255, (48, 48, 3), np.uint8)),
                    "cls": i % 4} for i in range(n)]
        if s == 2:
            samples[3] = {"__key__": "s2-003", "jpg": b"not an image"}
        write_shard(str(root / f"shard-{s}.tar"), samples)
    config = ExtractConfig(data=(str(root / "shard-{0..3}.tar"),), out=str(root / "store"),
                           second_order_layers=(1,), token_layers=(3,), rows_per_chunk=4, batch_size=5)
    run_extract(config, progress_display="off")
    return RunStore.open(config.out, "r+")


@pytest.fixture(scope="module")
def ray3():
    from clipscope.cluster.runtime import ray_runtime

    with ray_runtime(num_cpus=3, object_store_memory=150 * 1024 * 1024) as runtime:
        yield runtime


def test_means_equal_numpy_over_valid_rows(store):
    means = means_job.run(store, means_job.Settings(force=True)).means
    valid = store.read_valid()
    assert valid.sum() == 28  # 29 samples, one corrupt
    assert set(means) == set(mean_array_names(store))
    assert "second_order/layer_1/weights" in means and "direct/heads" in means
    for name, mean in means.items():
        ref = store.read(name)[valid].astype(np.float64).mean(0)
        np.testing.assert_allclose(mean, ref, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(store.read_result(f"reductions/means/{name}"), mean)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_ray_reductions_do_not_depend_on_worker_count(store, ray3, workers):
    cpus = 3 / workers  # at most `workers` tasks run at once on the 3-CPU Ray
    local = compute_means(store).means
    on_ray = RayExecutor(cpus_per_task=cpus, progress="off")
    remote = compute_means(store, executor=on_ray).means
    for name in local:
        np.testing.assert_array_equal(remote[name], local[name])
    local_stats = head_statistics(store, [2, 3])
    remote_stats = head_statistics(store, [2, 3], executor=on_ray)
    for a_row, b_row in zip(local_stats, remote_stats):
        for a, b in zip(a_row, b_row):
            assert a.count == b.count == 28
            assert torch.equal(a.gram, b.gram) and torch.equal(a.sum, b.sum)


def test_head_statistics_match_numpy_covariance(store):
    stats = head_statistics(store, [3], normalize=True)
    valid = store.read_valid()
    heads = store.read("direct/heads")[valid][:, 3].astype(np.float64)
    norms = np.linalg.norm(store.read("image_embedding")[valid].astype(np.float64), axis=-1)
    for h, s in enumerate(stats[0]):
        c = heads[:, h] / norms[:, None]
        np.testing.assert_allclose(s.covariance().numpy(), np.cov(c.T), rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(s.mean.numpy(), c.mean(0), rtol=1e-12, atol=1e-15)


def test_textspan_job_equals_in_memory_textspan(store):
    settings = textspan_job.Settings(layers=(2, 3), texts=tuple(TEXTS), basis_size=5, span_rank=16)
    table = textspan_job.run(store, settings).table()
    texts = torch.from_numpy(cached_text_embeddings(store, TEXTS)).double()
    valid = store.read_valid()
    heads = store.read("direct/heads")[valid].astype(np.float64)
    norms = np.linalg.norm(store.read("image_embedding")[valid].astype(np.float64), axis=-1)
    data = table.to_pydict()
    for layer in (2, 3):
        stored = store.read_result(f"reductions/textspan/layer_{layer}/indices")
        for head in range(heads.shape[2]):
            ref = textspan(torch.from_numpy(heads[:, layer, head] / norms[:, None]), texts, basis_size=5, span_rank=16)
            assert stored[head].tolist() == ref.indices.tolist()
            picked = [t for l, h, t in zip(data["layer"], data["head"], data["text"]) if (l, h) == (layer, head)]
            assert picked == [TEXTS[i] for i in ref.indices.tolist()]


def test_text_embeddings_are_cached_in_the_store(store):
    first = cached_text_embeddings(store, TEXTS)
    cached = [n for n in store.array_names() if n.startswith("text_embeddings/")]
    assert cached and store.dims(cached[0]) == ("text", "embed")
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1, rtol=1e-5)
    np.testing.assert_array_equal(cached_text_embeddings(store, TEXTS), first)


def test_textspan_rerun_with_another_basis_size_replaces_results(store):
    textspan_job.run(store, textspan_job.Settings(layers=(3,), texts=tuple(TEXTS), basis_size=4, span_rank=16))
    textspan_job.run(store, textspan_job.Settings(layers=(3,), texts=tuple(TEXTS), basis_size=2, span_rank=16))
    assert store.read_result("reductions/textspan/layer_3/indices").shape[1] == 2
    assert store.read_result("reductions/textspan/layer_3/variances").shape[1] == 2
    assert "direct/heads" in store.array_names()
