"""Concept discovery over a store (= a brute-force loop over the materialised φ and a dense γ), one image
through `image_concepts` (= its stored row), Ray = local, and the `concepts` / `query … concepts` commands."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from clipscope.errors import ConfigError, StoreError
from clipscope.kernels.decompose import second_order_effects
from clipscope.pipelines.jobs import concepts, neurons, second_order
from clipscope.pipelines.texts.embedding_cache import stored_texts
from clipscope.pipelines.texts.pools import get_pool
from clipscope.storage.store import RunStore

from extract_helpers import run_cli

LAYER = 1
TOP_K = 5


@pytest.fixture(scope="module")
def reduced(split_store, tmp_path_factory) -> str:
    """The session store with the second-order statistics and the OMP of LAYER over shapes-all."""
    path = tmp_path_factory.mktemp("concepts") / "store.zarr"
    shutil.copytree(split_store, path)
    store = RunStore.open(str(path), "r+")
    second_order.run(store, second_order.Settings(layer=LAYER, top_k=TOP_K))
    pool = get_pool("shapes-all")
    neurons.run(store, neurons.Settings(layer=LAYER, texts=tuple(pool.texts), pool_name=pool.name, m=(2, 4),
                                        accuracy=False))
    return str(path)


@pytest.fixture
def store(reduced, tmp_path) -> RunStore:
    shutil.copytree(reduced, tmp_path / "copy.zarr")
    return RunStore.open(str(tmp_path / "copy.zarr"), "r+")


def brute_force(store: RunStore, m: int, tau_of, top: int):
    """Per valid row: (texts best first, their scores, number of active neurons), by loops over the
    materialised φ and the dense coefficient matrix."""
    group = f"second_order/layer_{LAYER}"
    valid = store.read_valid()
    q = torch.from_numpy(store.read(f"{group}/weights")[valid].astype(np.float64))
    d = torch.from_numpy(store.read_result(f"{group}/directions").astype(np.float64))
    s = torch.from_numpy(store.read(f"{group}/shared")[valid].astype(np.float64))
    phi = second_order_effects(q, d, s).numpy()  # [sample neuron embed]
    prefix = f"reductions/second_order/layer_{LAYER}"
    q_mean = torch.from_numpy(store.read_result(f"{prefix}/mean_weights"))[None]
    s_mean = torch.from_numpy(store.read_result(f"{prefix}/mean_shared"))[None]
    phi_mean = second_order_effects(q_mean, d, s_mean).numpy()[0]
    norms = np.linalg.norm(phi - phi_mean, axis=-1)
    tau = tau_of(store)
    omp = f"reductions/omp/layer_{LAYER}"
    ms = list(store.read_result(f"{omp}/m"))
    support, coefs = store.read_result(f"{omp}/support"), store.read_result(f"{omp}/coefs")[ms.index(m)]
    n_texts = int(store.array(f"{omp}/support").attrs["n_texts"])
    gamma = np.zeros((support.shape[0], n_texts))
    for n in range(support.shape[0]):
        for p in range(support.shape[1]):
            if support[n, p] >= 0:
                gamma[n, support[n, p]] += coefs[n, p]
    out = []
    for i in range(norms.shape[0]):
        # τ_n is the norm of one of the store's images: there the materialised norm differs from the
        # Gram form's (which equals τ_n bit for bit and is not > τ_n) by rounding only
        active = [n for n in range(norms.shape[1]) if norms[i, n] > tau[n] * (1 + 1e-9)]
        w = np.zeros(n_texts)
        used = set()
        for n in active:
            w += gamma[n] * norms[i, n]
            used |= {int(j) for j in np.flatnonzero(gamma[n] != 0)}
        order = sorted(used, key=lambda j: (-w[j], j))[:top]
        out.append((order, [w[j] for j in order], len(active)))
    return np.flatnonzero(valid), out


def check_against(result: concepts.Result, rows, expected) -> None:
    for row, (order, scores, n_active) in zip(rows, expected):
        assert result.n_active[row] == n_active
        got = result.text_index[row]
        assert list(got[got >= 0]) == order, row
        np.testing.assert_allclose(result.score[row][got >= 0], scores, rtol=1e-9, atol=1e-12)
        assert np.isnan(result.score[row][got < 0]).all()
    invalid = np.setdiff1d(np.arange(len(result.n_active)), rows)
    assert (result.n_active[invalid] == -1).all() and (result.text_index[invalid] == -1).all()


@pytest.mark.parametrize("threshold,rank", [("topk", None), ("topk", 2), ("p98", None)])
def test_concepts_equal_brute_force(store, threshold, rank):
    settings = concepts.Settings(layer=LAYER, m=4 if rank is None else 2, threshold=threshold, rank=rank, top=6,
                                 chunks_per_block=1)
    result = concepts.run(store, settings)
    prefix = f"reductions/second_order/layer_{LAYER}"
    if threshold == "p98":
        def tau_of(s):
            return s.read_result(f"{prefix}/norm_p98")
    else:
        def tau_of(s):
            return s.read_result(f"{prefix}/topk_norms")[:, (rank or TOP_K) - 1]
    rows, expected = brute_force(store, settings.m, tau_of, settings.top)
    check_against(result, rows, expected)
    # by construction of τ (the rank-th largest norm), each neuron is active on at most rank − 1 images;
    # p98 of 17 images is (the grid edge above) the largest norm: nothing is active
    if threshold == "p98":
        assert result.n_active[rows].sum() == 0 and (result.text_index == -1).all()
    else:
        assert result.n_active[rows].sum() > 0
        assert result.n_active[rows].sum() <= ((settings.rank or TOP_K) - 1) * result.attrs["n_neurons"]
    # the stored result reads back, and a rerun is a no-op
    assert concepts.Result.read(RunStore.open(store.url, "r"), settings) == result
    assert concepts.run(store, settings) == result


def test_one_image_equals_its_stored_row(store):
    settings = concepts.Settings(layer=LAYER, top=5)
    result = concepts.run(store, settings)
    texts = stored_texts(store, result.attrs["texts_key"])
    row = int(np.flatnonzero(store.read_valid())[3])
    found = concepts.image_concepts(RunStore.open(store.url, "r"), row, settings)
    keep = result.text_index[row] >= 0
    assert found.texts == [texts[i] for i in result.text_index[row][keep]]
    np.testing.assert_array_equal(found.score, result.score[row][keep])
    assert found.n_active == result.n_active[row]
    assert "neurons active" in concepts.report.format_image(found)
    assert "active neurons per image" in concepts.report.format_summary(result, texts)


def test_bad_inputs(store, split_store, tmp_path):
    with pytest.raises(ConfigError, match=r"m must be one of the sparsities .* \[2, 4\], got 3"):
        concepts.run(store, concepts.Settings(layer=LAYER, m=3))
    with pytest.raises(ConfigError, match=r"rank must be ≤ the top-k the second-order job kept \(5\), got 9"):
        concepts.run(store, concepts.Settings(layer=LAYER, rank=9))
    with pytest.raises(ConfigError, match="threshold must be one of 'topk', 'p98'"):
        concepts.Settings(layer=LAYER, threshold="p50")
    bare = tmp_path / "bare.zarr"
    shutil.copytree(split_store, bare)
    with pytest.raises(StoreError, match="run `clipscope second-order"):
        concepts.run(RunStore.open(str(bare), "r+"), concepts.Settings(layer=LAYER))
    with pytest.raises(ConfigError, match="layer 0 has no second-order arrays"):
        concepts.run(store, concepts.Settings(layer=0))


@pytest.mark.slow  # an embedded Ray starts in ~15 s here
def test_ray_equals_local(store):
    from clipscope.cluster.executor import RayExecutor
    from clipscope.cluster.runtime import ray_runtime

    settings = concepts.Settings(layer=LAYER, chunks_per_block=1)
    local = concepts.run(store, settings)
    with ray_runtime(num_cpus=2, object_store_memory=150 * 1024 * 1024):
        on_ray = concepts.run(store, concepts.Settings(layer=LAYER, chunks_per_block=1, force=True),
                              RayExecutor(progress="off"))
    np.testing.assert_array_equal(local.text_index, on_ray.text_index)
    np.testing.assert_array_equal(local.score, on_ray.score)


def test_cli(store, capsys):
    assert run_cli("concepts", store.url, "--layer", LAYER, "--top", "4") == 0
    out = capsys.readouterr().out
    assert "active neurons per image" in out
    row = int(np.flatnonzero(store.read_valid())[0])
    assert run_cli("query", store.url, "concepts", str(row), "--layer", LAYER, "--top", "4") == 0
    assert "neurons active" in capsys.readouterr().out
    assert run_cli("concepts", store.url, "--layer", LAYER, "--m", "3") == 2
    assert "--m must be one of" in capsys.readouterr().err


def test_default_m_is_the_largest_stored_sparsity_at_most_a_quarter_of_the_embedding():
    from clipscope.pipelines.jobs.concepts.job import default_m

    assert default_m([4, 8, 16, 32, 50], 32) == 8  # the shapes CLIP: 50 texts, 32 dimensions
    assert default_m([4, 8, 16, 32, 64, 128], 512) == 128  # ViT-B: the paper's m
    assert default_m([4, 8, 16, 32, 64, 128], 768) == 128
    assert default_m([16, 32], 32) == 16  # none that sparse: the sparsest stored
    assert default_m([4, 50], None) == 50  # dimension unknown: the largest
