"""The second-order store job against a brute force that materialises φ for every image and neuron."""

import dataclasses
import os
import shutil

import numpy as np
import pytest
import torch

from clipscope.errors import ConfigError, StoreError
from clipscope.kernels.decompose import second_order_effects
from clipscope.kernels.second_order_ablation import ABLATIONS
from clipscope.pipelines.jobs.means.job import compute_means, row_blocks
from clipscope.pipelines.jobs import second_order
from clipscope.pipelines.jobs.second_order.ablation import ablation_accuracy, ablation_block, top_membership
from clipscope.pipelines.jobs.second_order.result import RESULT_DIMS
from clipscope.pipelines.jobs.second_order.settings import SecondOrderSettings
from clipscope.pipelines.jobs.second_order.statistics import SIGNIFICANCE_PERCENT, norm_bin_edges
from clipscope.pipelines.texts.zero_shot import accuracy, classifier, get_task, store_classes
from clipscope.storage.store import RunStore

from extract_helpers import extract_args, run_cli

LAYER = 1
PREFIX = f"reductions/second_order/layer_{LAYER}"
K = 5


@pytest.fixture(scope="module")
def shapes_store(tmp_path_factory, fast_models) -> str:
    """Shapes-world images (labelled) through the tiny model, second-order layer 1, split convention."""
    from clipscope.pipelines.worlds.shapes.world import write_world

    root = tmp_path_factory.mktemp("second_order")
    write_world(root / "world", n_shards=2, per_shard=18, seed=3)
    out = root / "shapes.zarr"
    assert run_cli(*extract_args(str(root / "world" / "shapes-{00000..00001}.tar"), out,
                                 "--second-order-layers", LAYER, "--ln-convention", "split")) == 0
    return str(out)


@pytest.fixture
def center_copy(center_store, tmp_path) -> RunStore:
    """A private copy of the session's center-convention store (results are written into it)."""
    path = tmp_path / "center.zarr"
    shutil.copytree(center_store, path)
    return RunStore.open(str(path), "r+")


def reference_sign(v, rows):
    proj = rows @ v
    if (proj > 0).sum() != (proj < 0).sum():
        return v if (proj > 0).sum() > (proj < 0).sum() else -v
    return v * np.sign(proj.sum())


def brute_force(store: RunStore, k: int) -> dict:
    """Every statistic from φ [image neuron embed] materialised with second_order_effects."""
    rows = np.flatnonzero(store.read_valid())
    base = f"second_order/layer_{LAYER}"
    q = torch.from_numpy(store.read(f"{base}/weights")[rows]).double()
    d = torch.from_numpy(store.read_result(f"{base}/directions")).double()
    shared = None
    if f"{base}/shared" in store.array_names():
        shared = torch.from_numpy(store.read(f"{base}/shared")[rows]).double()
    phi = second_order_effects(q, d, shared).numpy()
    centred = phi - phi.mean(0)
    norms = np.linalg.norm(centred, axis=-1)  # [image neuron]
    count, n = norms.shape
    order = np.argsort(-norms, axis=0, kind="stable")[:k]  # [rank neuron]
    top_norms = np.take_along_axis(norms, order, 0).T
    pcs, explained = [], []
    for neuron in range(n):
        top = centred[order[:, neuron], neuron]
        _, s, vh = np.linalg.svd(top, full_matrices=False)
        pcs.append(reference_sign(vh[0], top))
        explained.append(s[0] ** 2 / (s**2).sum())
    edges = norm_bin_edges()
    bins = np.searchsorted(edges, norms, side="right")
    histogram = np.stack([np.bincount(bins[:, j], minlength=len(edges) + 1) for j in range(n)])
    upper = np.append(edges, np.inf)
    rank = int(np.ceil(SIGNIFICANCE_PERCENT * count / 100))
    p98 = upper[np.searchsorted(edges, np.sort(norms, axis=0)[rank - 1], side="right")]
    layer_rank = int(np.ceil(SIGNIFICANCE_PERCENT * count * n / 100))
    threshold = upper[np.searchsorted(edges, np.sort(norms.ravel())[layer_rank - 1], side="right")]
    return {
        "rows": rows, "phi": phi, "centred": centred, "norms": norms,
        "mean_weights": q.numpy().mean(0),
        "mean_shared": None if shared is None else shared.numpy().mean(0),
        "norm_mean": norms.mean(0), "norm_max": norms.max(0), "norm_p98": p98,
        "energy_topk": (top_norms**2).sum(1) / (norms**2).sum(0),
        "significant_share": (norms >= threshold).mean(0), "significance_threshold": threshold,
        "norm_histogram": histogram, "topk_rows": rows[order].T, "topk_norms": top_norms,
        "pc": np.stack(pcs), "pc_explained": np.array(explained),
    }


def check_against_brute_force(result, ref, k):
    a = result.arrays
    np.testing.assert_array_equal(a["topk_rows"][:, :k], ref["topk_rows"])
    np.testing.assert_array_equal(a["norm_histogram"], ref["norm_histogram"])
    np.testing.assert_array_equal(a["norm_p98"], ref["norm_p98"])
    np.testing.assert_array_equal(a["significant_share"], ref["significant_share"])
    assert result.attrs["significance_threshold"] == ref["significance_threshold"]
    for name in ("mean_weights", "norm_mean", "norm_max", "energy_topk", "topk_norms", "pc_explained"):
        np.testing.assert_allclose(a[name][:, :k] if name == "topk_norms" else a[name], ref[name],
                                   rtol=1e-9, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(a["pc"], ref["pc"], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(a["pc"], axis=1), 1.0, rtol=1e-12)
    if ref["mean_shared"] is not None:
        np.testing.assert_allclose(a["mean_shared"], ref["mean_shared"], rtol=1e-9, atol=1e-12)
    else:
        assert "mean_shared" not in a


def test_split_store_statistics_match_brute_force(shapes_store):
    store = RunStore.open(shapes_store, "r+")
    settings = SecondOrderSettings(LAYER, top_k=K, neuron_chunk=100, chunks_per_block=1)  # 10 blocks, 3 chunks
    result = second_order.run(store, settings)
    ref = brute_force(store, K)
    assert ref["centred"].shape[0] == 36 and result.attrs["convention"] == "split"
    check_against_brute_force(result, ref, K)
    # The significance statistic is not trivial on this store, and the layer threshold keeps ≤ 2%.
    assert result.arrays["significant_share"].mean() <= 0.02 < result.arrays["significant_share"].max()
    for name, value in result.arrays.items():
        stored = store.read_result(f"{PREFIX}/{name}")
        np.testing.assert_array_equal(stored, value)
        assert store.dims(f"{PREFIX}/{name}") == RESULT_DIMS[name]
        assert store.array(f"{PREFIX}/{name}").attrs["count"] == 36


def test_center_store_without_shared_term_and_k_above_count(center_copy):
    # 17 valid images, k = 20: every image is in every neuron's top set; padding −1 / NaN.
    result = second_order.run(center_copy, SecondOrderSettings(LAYER, top_k=20, chunks_per_block=1))
    ref = brute_force(center_copy, 20)
    assert result.attrs["convention"] == "center" and result.attrs["topk_fraction"] == 1.0
    check_against_brute_force(result, ref, 17)
    assert (result.arrays["topk_rows"][:, 17:] == -1).all() and np.isnan(result.arrays["topk_norms"][:, 17:]).all()
    np.testing.assert_allclose(result.arrays["energy_topk"], 1.0, rtol=1e-12)


def test_means_are_reused_only_when_their_count_is_current(center_copy):
    name = f"second_order/layer_{LAYER}/weights"
    true = compute_means(center_copy, [name]).means[name]
    planted = true + 1.0
    dims = center_copy.dims(name)[1:]
    center_copy.write_result(f"reductions/means/{name}", planted, dims, {"count": 17})
    settings = SecondOrderSettings(LAYER, top_k=3)
    reused = second_order.run(center_copy, settings)
    np.testing.assert_array_equal(reused.arrays["mean_weights"], planted)
    center_copy.write_result(f"reductions/means/{name}", planted, dims, {"count": 16})
    fresh = second_order.run(center_copy, dataclasses.replace(settings, force=True))
    np.testing.assert_array_equal(fresh.arrays["mean_weights"], true)
    np.testing.assert_array_equal(center_copy.read_result(f"reductions/means/{name}"), true)


def test_ray_result_equals_local_result(shapes_store):
    from clipscope.cluster.executor import open_executor

    store = RunStore.open(shapes_store, "r+")
    settings = SecondOrderSettings(LAYER, top_k=K, neuron_chunk=64, chunks_per_block=1)
    local = second_order.run(store, settings)
    g = np.random.default_rng(0)
    weights = g.normal(size=(store.read_result(f"{PREFIX}/pc").shape[1], 6))
    classes = np.where(store.read_valid(), np.arange(store.n_rows) % 6, -1)
    local_table = ablation_accuracy(store, settings, weights, classes)
    with open_executor(2, object_store_memory=150 * 1024 * 1024, progress="off") as on_ray:
        remote = second_order.run(store, dataclasses.replace(settings, force=True), on_ray)
        remote_table = ablation_accuracy(store, settings, weights, classes, on_ray)
    assert remote.attrs == local.attrs and set(remote.arrays) == set(local.arrays)
    for name, value in local.arrays.items():
        if value.dtype.kind in "iu":
            np.testing.assert_array_equal(remote.arrays[name], value)
        else:
            np.testing.assert_allclose(remote.arrays[name], value, rtol=1e-12, atol=1e-15, err_msg=name)
    assert remote_table == local_table


def brute_force_embeddings(store: RunStore, ref: dict) -> dict[str, np.ndarray]:
    """The ablated image embeddings of every valid row from materialised φ and the stored PCs/top rows."""
    rows = ref["rows"]
    emb = store.read("image_embedding")[rows].astype(np.float64)
    centred = ref["centred"]
    top_rows = store.read_result(f"{PREFIX}/topk_rows")
    pc = store.read_result(f"{PREFIX}/pc")
    in_top = np.stack([np.isin(rows, top_rows[n]) for n in range(top_rows.shape[0])], axis=1)  # [image neuron]
    x = np.einsum("bne,ne->bn", centred, pc)
    return {
        "baseline": emb,
        "all_neurons": emb - centred.sum(1),
        "small_norm": emb - (centred * ~in_top[:, :, None]).sum(1),
        "large_norm": emb - (centred * in_top[:, :, None]).sum(1),
        "pc1_reconstruction": emb - centred.sum(1) + x @ pc,
    }


def test_evaluation_equals_materialised_ablations(shapes_store):
    store = RunStore.open(shapes_store, "r+")
    settings = SecondOrderSettings(LAYER, top_k=K, neuron_chunk=100, chunks_per_block=1)
    second_order.run(store, settings)
    ref = brute_force(store, K)
    embeddings = brute_force_embeddings(store, ref)
    # The "all neurons" embedding is emb − Σ_n (φ_n − φ̄_n) with φ from second_order_effects.
    np.testing.assert_allclose(embeddings["all_neurons"],
                               embeddings["baseline"] - (ref["phi"] - ref["phi"].mean(0)).sum(1), rtol=1e-12)
    g = np.random.default_rng(1)
    weights = g.normal(size=(embeddings["baseline"].shape[1], 9))
    rows = ref["rows"]
    # The embeddings the job forms per block, neuron chunk by neuron chunk, are the materialised ones.
    block = ablation_block(store, settings, weights, np.where(store.read_valid(), 0, -1))
    seen = []
    for part in row_blocks(store, 1):
        index, got = block.embeddings(part)
        seen.extend(index)
        for i, name in enumerate(ABLATIONS):
            np.testing.assert_allclose(got[i].numpy(), embeddings[name][np.searchsorted(rows, index)],
                                       rtol=1e-10, atol=1e-12, err_msg=name)
    assert seen == rows.tolist()
    # Classes = the prediction under one ablation: that ablation scores 1, the others what they score.
    for target in ("all_neurons", "small_norm", "pc1_reconstruction"):
        classes = np.full(store.n_rows, -1)
        classes[rows] = (embeddings[target] @ weights).argmax(1)
        table = ablation_accuracy(store, settings, weights, classes)
        assert table["labelled"] == len(rows) and table[target] == 1.0
        for name in ABLATIONS:
            assert table[name] == pytest.approx(accuracy(embeddings[name], weights, classes[rows]), abs=1e-12), name
        assert min(table.values()) < 1.0
    # With the zero-shot task: the stored table equals zero_shot.accuracy on the materialised embeddings.
    task = get_task("shapes")
    table = second_order.run(store, dataclasses.replace(settings, task=task.name)).accuracy
    classes = store_classes(store, task)
    w = classifier(store, task)
    for name in ABLATIONS:
        assert table[name] == pytest.approx(accuracy(embeddings[name], w, classes[rows]), abs=1e-12)
    stored = store.read_result(f"{PREFIX}/evaluation")
    np.testing.assert_array_equal(stored, [table[a] for a in ABLATIONS])
    assert store.array(f"{PREFIX}/evaluation").attrs["ablations"] == list(ABLATIONS)
    assert store.dims(f"{PREFIX}/evaluation") == ("ablation",)


def test_top_membership_matches_isin():
    g = np.random.default_rng(2)
    top = g.choice(40, size=(7, 5), replace=True)
    top[2, 3:] = -1
    rows = np.sort(g.choice(40, size=12, replace=False))
    expected = np.stack([np.isin(rows, top[n]) for n in range(7)], axis=1)
    np.testing.assert_array_equal(top_membership(top, rows), expected)


def test_cli_prints_summary_and_table(shapes_store, capsys):
    assert run_cli("second-order", shapes_store, "--layer", LAYER, "--top-k", K, "--task", "shapes") == 0
    out = capsys.readouterr().out
    assert "layer 1: 256 neurons over 36 images" in out
    for label in ("baseline", "w/o all neurons", "w/o small norm", "w/o large norm", "PC1 reconstruction"):
        assert label in out
    store = RunStore.open(shapes_store)
    assert store.array(f"{PREFIX}/evaluation").attrs["task"] == "shapes"
    assert store.read_result(f"{PREFIX}/topk_rows").shape == (256, K)


@pytest.mark.parametrize("argv, message", [
    (["--layer", "2"], "layer 2 has no second-order arrays"),
    (["--layer", "1", "--top-k", "0"], "--top-k must be an integer ≥ 1, got 0"),
    (["--layer", "1", "--workers", "0"], "--workers must be an integer ≥ 1"),
    (["--layer", "1", "--task", "nonsense"], "unknown zero-shot task 'nonsense'"),
])
def test_cli_errors_exit_2(shapes_store, capsys, argv, message):
    assert run_cli("second-order", shapes_store, *argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_missing_store_exits_2(tmp_path, capsys):
    assert run_cli("second-order", os.fspath(tmp_path / "nope.zarr"), "--layer", "1") == 2
    assert "no run store" in capsys.readouterr().err


def test_evaluation_needs_results_and_labels(center_copy):
    with pytest.raises(StoreError, match="no second-order results for layer 1"):
        ablation_accuracy(center_copy, SecondOrderSettings(LAYER), np.eye(32), np.zeros(center_copy.n_rows, np.int64))
    second_order.run(center_copy, SecondOrderSettings(LAYER, top_k=3))
    with pytest.raises(ConfigError, match="no labelled samples"):
        ablation_accuracy(center_copy, SecondOrderSettings(LAYER), np.eye(32), np.full(center_copy.n_rows, -1))
    with pytest.raises(ConfigError, match="classes must have shape"):
        ablation_accuracy(center_copy, SecondOrderSettings(LAYER), np.eye(32), np.zeros(3, np.int64))
