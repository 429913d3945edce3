"""OMP of every neuron's PC (supports and coefficients = sklearn), the reconstruction accuracy (= a
brute-force pass over the materialised φ), Ray = local, and the `clipscope neurons` command."""

import dataclasses
import json
import os
import shutil
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.linear_model import orthogonal_mp_gram

from clipscope.cluster.executor import RayExecutor
from clipscope.errors import ConfigError, StoreError
from clipscope.kernels.decompose import second_order_effects
from clipscope.kernels.omp import reference_dictionary
from clipscope.pipelines.jobs import neurons
from clipscope.pipelines.jobs.neurons import job as omp_job
from clipscope.pipelines.jobs.neurons import report
from clipscope.pipelines.worlds.shapes.world import write_world
from clipscope.pipelines.texts.pools import TextPool, get_pool, pool_hash
from clipscope.pipelines.texts.embedding_cache import cached_text_embeddings, embeddings_key
from clipscope.pipelines.texts.zero_shot import accuracy, classifier, get_task, store_classes
from clipscope.storage.store import RunStore

from extract_helpers import extract_args, run_cli

LAYER = 1
TOP_K = 8
PC_IS_TEXT, PC_IS_ZERO = 0, 1  # two neurons whose PCs are replaced by degenerate ones
TEXT_OF_NEURON_0 = 5  # index of the pool text neuron 0's PC equals


def materialised_phi(store: RunStore) -> tuple[np.ndarray, np.ndarray]:
    """(valid mask, φ [valid sample, neuron, embed]) straight from the definition, in float64."""
    group = f"second_order/layer_{LAYER}"
    valid = store.read_valid()
    q = torch.from_numpy(store.read(f"{group}/weights")[valid].astype(np.float64))
    d = torch.from_numpy(store.read_result(f"{group}/directions").astype(np.float64))
    shared = None
    if f"{group}/shared" in store.array_names():
        shared = torch.from_numpy(store.read(f"{group}/shared")[valid].astype(np.float64))
    return valid, second_order_effects(q, d, shared).numpy()


def write_pcs(store: RunStore, embeddings: np.ndarray) -> np.ndarray:
    """Reference-style PCs from the materialised φ (top-k centred norms, first right singular vector,
    sign of the majority of projections), two of them replaced by a pool text and by 0."""
    _, phi = materialised_phi(store)
    centred = phi - phi.mean(0)
    norms = np.linalg.norm(centred, axis=-1)  # [sample neuron]
    pcs, explained = [], []
    for n in range(phi.shape[1]):
        top = centred[np.argsort(-norms[:, n], kind="stable")[:TOP_K], n]
        _, s, vh = np.linalg.svd(top, full_matrices=False)
        v = vh[0] if ((top @ vh[0]) > 0).sum() * 2 > TOP_K else -vh[0]
        pcs.append(v)
        explained.append(s[0] ** 2 / (s ** 2).sum())
    pcs = np.array(pcs)
    pcs[PC_IS_TEXT] = embeddings[TEXT_OF_NEURON_0]
    pcs[PC_IS_ZERO] = 0.0
    prefix = f"reductions/second_order/layer_{LAYER}"
    store.write_result(f"{prefix}/pc", pcs, ("neuron", "embed"))
    store.write_result(f"{prefix}/pc_explained", np.array(explained), ("neuron",))
    store.write_result(f"{prefix}/norm_mean", norms.mean(0), ("neuron",))
    return pcs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    write_world(folder, 2, 12, seed=3)
    return os.path.join(str(folder), "shapes-{00000..00001}.tar")


def _world_store(tmp_path_factory, world, convention: str) -> str:
    out = tmp_path_factory.mktemp("omp") / f"{convention}.zarr"
    assert run_cli(*extract_args(world, out, "--second-order-layers", LAYER, "--ln-convention", convention)) == 0
    store = RunStore.open(str(out), "r+")
    write_pcs(store, cached_text_embeddings(store, get_pool("shapes-all").texts))
    return str(out)


@pytest.fixture(scope="module")
def split_world(tmp_path_factory, world, fast_models) -> str:
    """Labelled shapes-world shards extracted with the tiny model (split convention), PCs written."""
    return _world_store(tmp_path_factory, world, "split")


@pytest.fixture(scope="module")
def center_world(tmp_path_factory, world, fast_models) -> str:
    return _world_store(tmp_path_factory, world, "center")


@pytest.fixture
def store(split_world, tmp_path) -> RunStore:
    """A private copy of the split store (tests write results into it)."""
    shutil.copytree(split_world, tmp_path / "copy.zarr")
    return RunStore.open(str(tmp_path / "copy.zarr"), "r+")


def settings(pool, **kwargs) -> neurons.Settings:
    return neurons.Settings(layer=LAYER, texts=tuple(pool.texts), pool_name=pool.name, **kwargs)


def sklearn_dense(gram: np.ndarray, xy: np.ndarray, m: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # early stops (rank 32 < m, exact fits, zero PC)
        return orthogonal_mp_gram(gram, xy.T, n_nonzero_coefs=m).reshape(gram.shape[0], -1).T


def sklearn_order(gram: np.ndarray, xy: np.ndarray, m: int) -> list[int]:
    """sklearn's pick order for one target, read off its coefficient path."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        path = orthogonal_mp_gram(gram, xy, n_nonzero_coefs=m, return_path=True).reshape(gram.shape[0], -1)
    order: list[int] = []
    for step in range(path.shape[1]):
        order += [int(a) for a in np.flatnonzero(path[:, step]) if a not in order]
    return order


def dense(support: np.ndarray, coefs: np.ndarray, n_atoms: int) -> np.ndarray:
    out = np.zeros((support.shape[0], n_atoms + 1))
    np.put_along_axis(out, np.where(support >= 0, support, n_atoms), coefs, axis=1)
    return out[:, :n_atoms]


# ----------------------------------------------------------------------------------------------
# OMP = sklearn


@pytest.mark.parametrize("preprocessing", [False, True], ids=["unit-texts", "reference-dictionary"])
def test_supports_and_coefficients_equal_sklearn(store, preprocessing):
    pool = get_pool("shapes-all")
    result = neurons.run(store, settings(pool, reference_preprocessing=preprocessing, accuracy=False))
    assert result.m == (4, 8, 16, 32, 50)  # 64 and 128 capped by the 50 texts
    embeddings = cached_text_embeddings(store, pool.texts).astype(np.float64)
    x = reference_dictionary(torch.from_numpy(embeddings)).numpy() if preprocessing else embeddings
    pcs = store.read_result(f"reductions/second_order/layer_{LAYER}/pc").astype(np.float64)
    gram, xy = x @ x.T, pcs @ x.T
    support = result.support
    n_active = (support >= 0).sum(1)
    assert support.shape == (256, 50) and n_active.max() <= 32  # the 32-dim space is spanned by then
    for i, m in enumerate(result.m):
        ours = dense(support, result.coefs[i], len(pool))
        np.testing.assert_allclose(ours, sklearn_dense(gram, xy, m), rtol=1e-8, atol=1e-10)
        recon = ours @ x
        np.testing.assert_allclose(result.residual_norm[:, i], np.linalg.norm(pcs - recon, axis=1), atol=1e-12)
    for n in range(0, 256, 9):  # pick order, neuron by neuron (sklearn's path)
        k = int(n_active[n])
        if k:
            assert support[n, :k].tolist() == sklearn_order(gram, xy[n], k)
    # degenerate PCs: one text (unit dictionary: exactly that atom, then a stop) and the zero vector
    assert (support[PC_IS_ZERO] == -1).all() and (result.coefs[:, PC_IS_ZERO] == 0).all()
    if not preprocessing:
        assert support[PC_IS_TEXT].tolist() == [TEXT_OF_NEURON_0] + [-1] * 49
        np.testing.assert_allclose(result.coefs[:, PC_IS_TEXT, 0], 1.0, rtol=1e-12)
    # residuals shrink with m; the store holds what was returned
    assert (np.diff(result.residual_norm, axis=1) <= 1e-12).all()
    group = f"reductions/omp/layer_{LAYER}"
    np.testing.assert_array_equal(store.read_result(f"{group}/support"), result.support)
    np.testing.assert_array_equal(store.read_result(f"{group}/coefs"), result.coefs)
    np.testing.assert_array_equal(store.read_result(f"{group}/residual_norm"), result.residual_norm)
    np.testing.assert_array_equal(store.read_result(f"{group}/m"), [4, 8, 16, 32, 50])
    attrs = store.array(f"{group}/coefs").attrs
    assert attrs["pool_hash"] == pool.hash and attrs["preprocessing"] == ("reference" if preprocessing else "none")
    assert store.dims(f"{group}/coefs") == ("m", "neuron", "pick")


def test_planted_sparse_combinations_are_recovered(store):
    """PCs that are exact 2-term combinations of pool texts: OMP finds those texts and weights."""
    rng = np.random.default_rng(4)
    texts = [f"planted text {i}" for i in range(40)]
    atoms = rng.normal(size=(40, 32))
    atoms = (atoms / np.linalg.norm(atoms, axis=1, keepdims=True)).astype(np.float32)
    key = embeddings_key(texts, store.attrs["model"])  # filled cache: no model is asked
    store.write_result(f"text_embeddings/{key}/embeddings", atoms, ("text", "embed"))
    planted = np.stack([rng.choice(40, size=2, replace=False) for _ in range(256)])
    weights = rng.uniform(0.5, 1.5, size=(256, 2)) * rng.choice([-1.0, 1.0], size=(256, 2))
    pcs = np.einsum("nk,nke->ne", weights, atoms[planted].astype(np.float64))
    store.write_result(f"reductions/second_order/layer_{LAYER}/pc", pcs, ("neuron", "embed"))
    result = neurons.run(store, settings(TextPool("planted", texts, pool_hash(texts)), m=(1, 2, 8), accuracy=False))
    assert result.m == (1, 2, 8)
    found = result.support[:, :2]
    assert (np.sort(found, axis=1) == np.sort(planted, axis=1)).all()
    assert (result.support[:, 2:] == -1).all()  # exact after 2 atoms: OMP stops
    order = np.argsort(planted, axis=1)
    got = np.take_along_axis(result.coefs[1, :, :2], np.argsort(found, axis=1), axis=1)
    np.testing.assert_allclose(got, np.take_along_axis(weights, order, axis=1), rtol=1e-9)
    np.testing.assert_allclose(result.coefs[2], result.coefs[1], rtol=1e-12)
    assert (result.residual_norm[:, 1:] < 1e-12).all() and (result.residual_norm[:, 0] > 0.1).all()


def test_signed_top_texts_table(store):
    pool = get_pool("shapes-all")
    result = neurons.run(store, settings(pool, accuracy=False))
    explained = store.read_result(f"reductions/second_order/layer_{LAYER}/pc_explained")
    table = report.neuron_table(result, pool, m=16, top=4, neurons=[PC_IS_TEXT, PC_IS_ZERO, 7, 30],
                                pc_explained=explained)
    rows = table.to_pylist()
    assert [r["text"] for r in rows if r["neuron"] == PC_IS_TEXT] == [pool.texts[TEXT_OF_NEURON_0]]
    assert not [r for r in rows if r["neuron"] == PC_IS_ZERO]
    for n in (7, 30):
        mine = [r for r in rows if r["neuron"] == n]
        assert len(mine) == 4 and [r["rank"] for r in mine] == [0, 1, 2, 3]
        coefs = dense(result.support[n:n + 1], result.coefs[2, n:n + 1], len(pool))[0]
        best = np.argsort(-np.abs(coefs), kind="stable")[:4]
        assert [r["text_index"] for r in mine] == best.tolist()
        assert [r["coefficient"] for r in mine] == coefs[best].tolist()
        assert [r["sign"] for r in mine] == ["+" if c > 0 else "-" for c in coefs[best]]
        assert all(r["pc_explained"] == explained[n] for r in mine)
        assert all(r["residual_norm"] == result.residual_norm[n, 2] for r in mine)
    text = report.format_neurons(table, [7, PC_IS_ZERO], 16)
    assert text.splitlines()[0].startswith(f"neuron 7 (PC1 explains {explained[7]:.1%}")
    assert "(no text: its PC is 0)" in text.splitlines()[1]
    with pytest.raises(ConfigError, match="^m 5 was not solved"):
        report.neuron_table(result, pool, m=5)
    with pytest.raises(StoreError, match="used pool 'shapes-all', not 'shapes-colours'"):
        report.neuron_table(result, get_pool("shapes-colours"), m=4)


# ----------------------------------------------------------------------------------------------
# Reconstruction accuracy = brute force over the materialised φ


@pytest.mark.parametrize("convention", ["split", "center"])
def test_reconstruction_accuracy_equals_materialised_phi(convention, split_world, center_world, tmp_path):
    shutil.copytree({"split": split_world, "center": center_world}[convention], tmp_path / "s.zarr")
    store = RunStore.open(str(tmp_path / "s.zarr"), "r+")
    pool = get_pool("shapes-all")
    neurons.run(store, settings(pool, accuracy=False))
    task = get_task("shapes")
    weights, classes = classifier(store, task), store_classes(store, task)
    _, pcs, recon = omp_job.reconstructions(store, LAYER)

    # brute force: φ for every valid image and neuron, centred, replaced by ⟨φ − φ̄, r⟩ r̂
    valid, phi = materialised_phi(store)
    centred = phi - phi.mean(0)
    x = np.einsum("sne,ne->sn", centred, pcs)
    emb = store.read("image_embedding")[valid].astype(np.float64)
    variants = np.concatenate([pcs[None], recon])
    expected = np.stack([emb] + [emb - centred.sum(1) + x @ v for v in variants])
    assert np.abs(expected[1] - expected[0]).max() > 1e-3  # the replacement changes the embeddings

    block, sparsities = omp_job.replace_block(store, LAYER, weights, classes)
    assert sparsities == (4, 8, 16, 32, 50) and (block.shared_mean is None) == (convention == "center")
    parts = [block.embeddings(rows) for rows in omp_job.row_blocks(store)]
    assert np.concatenate([mask for mask, _ in parts]).tolist() == valid.tolist()
    got = np.concatenate([e for _, e in parts], axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())

    returned = neurons.run(store, settings(pool, task="shapes"))
    result = returned.accuracy
    read = neurons.Result.read(store, settings(pool, task="shapes"))
    assert read.accuracy.accuracy.tolist() == result.accuracy.tolist() and read.accuracy.m == result.m
    assert (read.accuracy.task, read.accuracy.pc_accuracy, read.accuracy.baseline, read.accuracy.n_labelled) == \
        (result.task, result.pc_accuracy, result.baseline, result.n_labelled)
    labelled = classes[valid]
    reference = [accuracy(e, weights, labelled) for e in expected]
    assert result.baseline == reference[0] and result.pc_accuracy == reference[1]
    assert result.accuracy.tolist() == reference[2:]
    assert result.n_labelled == int((labelled >= 0).sum()) == 24 and result.task == "shapes"
    stored = store.array(f"reductions/omp/layer_{LAYER}/accuracy")
    np.testing.assert_array_equal(stored[...], result.accuracy)
    assert stored.attrs["pc1_accuracy"] == result.pc_accuracy and stored.attrs["task"] == "shapes"
    assert "original embedding" in report.format_accuracy(result)

    # The random model scores every variant alike; classes read off one variant's own predictions
    # make the per-variant counts differ, and the block counts must follow.
    planted = np.full(store.n_rows, -1)
    planted[valid] = (expected[3] @ weights).argmax(1)
    counted = dataclasses.replace(block, classes=planted)
    total = sum(counted(rows)["correct"] for rows in omp_job.row_blocks(store))
    brute = [round(accuracy(e, weights, planted[valid]) * valid.sum()) for e in expected]
    assert total.tolist() == brute and brute[3] == valid.sum() and len(set(brute)) > 1


def test_stale_or_inconsistent_inputs_are_refused(store):
    pool = get_pool("shapes-all")
    prefix = f"reductions/second_order/layer_{LAYER}"
    result = neurons.run(store, settings(pool, accuracy=False))
    key = result.attrs["texts_key"]
    pcs = store.read_result(f"{prefix}/pc")
    store.write_result(f"{prefix}/pc", -pcs)
    with pytest.raises(StoreError, match="PCs of layer 1 changed since its OMP ran"):
        omp_job.reconstructions(store, LAYER)
    store.write_result(f"{prefix}/pc", pcs)
    embeddings = store.read_result(f"text_embeddings/{key}/embeddings")
    store.delete_results(f"text_embeddings/{key}")
    with pytest.raises(StoreError, match="lost the text embeddings"):
        neurons.run(store, settings(pool, task="shapes"))
    store.write_result(f"text_embeddings/{key}/embeddings", embeddings, ("text", "embed"))
    with pytest.raises(ConfigError, match="no valid sample of .* has a class under the zero-shot task"):
        neurons.run(store, settings(pool, task="omp-test-unlabelled"))
    # PCs of another neuron count than the layer's directions, or of another width than the texts
    store.delete_results(prefix)
    store.write_result(f"{prefix}/pc", pcs[:100], ("neuron", "embed"))
    neurons.run(store, settings(pool, accuracy=False))
    with pytest.raises(StoreError, match="does not fit the PCs"):
        neurons.run(store, settings(pool, task="shapes"))
    store.delete_results(prefix)
    store.write_result(f"{prefix}/pc", pcs[:, :16], ("neuron", "pc_embed"))
    with pytest.raises(StoreError, match="text embeddings have 32 dims but the PCs of layer 1 have 16"):
        neurons.run(store, settings(pool, accuracy=False))
    store.write_result(f"{prefix}/pc", np.full((4, 16), np.nan), ("neuron", "pc_embed"))
    with pytest.raises(StoreError, match="must be a finite"):
        neurons.run(store, settings(pool, accuracy=False))


@pytest.mark.parametrize("kwargs,message", [
    ({"m": ()}, "^m must name at least one sparsity"),
    ({"m": (4, 0)}, "^m must be integers ≥ 1, got 0"),
    ({"m": (2.5,)}, "^m must be integers ≥ 1, got 2.5"),
    ({"neurons_per_task": 0}, "neurons_per_task must be an integer ≥ 1, got 0"),
])
def test_bad_settings(store, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        neurons.run(store, settings(get_pool("shapes-all"), **kwargs))


@pytest.fixture(scope="module", autouse=True)
def unlabelled_task():
    """A zero-shot task under which no stored label names a class."""
    from clipscope.pipelines.texts.zero_shot import ZeroShotTask, register_task

    register_task("omp-test-unlabelled", lambda: ZeroShotTask(
        "omp-test-unlabelled", ("a", "b"), (lambda name: name,), lambda labels: np.full_like(labels, -1)),
        replace=True)


# ----------------------------------------------------------------------------------------------
# Ray = local


@pytest.fixture(scope="module")
def ray2():
    from clipscope.cluster.runtime import ray_runtime

    with ray_runtime(num_cpus=2, object_store_memory=150 * 1024 * 1024) as runtime:
        yield runtime


@pytest.mark.slow  # an embedded Ray starts in ~15 s here
def test_ray_equals_local(store, ray2, capsys):
    pool = get_pool("shapes-all")
    local = neurons.run(store, settings(pool, reference_preprocessing=True, accuracy=False))
    local_acc = neurons.run(store, settings(pool, reference_preprocessing=True, task="shapes")).accuracy
    on_ray = RayExecutor(progress="off")
    remote = neurons.run(store, settings(pool, reference_preprocessing=True, neurons_per_task=100, accuracy=False),
                         on_ray)
    np.testing.assert_array_equal(remote.support, local.support)
    np.testing.assert_allclose(remote.coefs, local.coefs, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(remote.residual_norm, local.residual_norm, rtol=1e-10, atol=1e-14)
    remote_acc = neurons.run(store, settings(pool, reference_preprocessing=True, task="shapes"), on_ray).accuracy
    assert remote_acc.accuracy.tolist() == local_acc.accuracy.tolist()
    assert (remote_acc.pc_accuracy, remote_acc.baseline, remote_acc.n_labelled) == \
        (local_acc.pc_accuracy, local_acc.baseline, local_acc.n_labelled)
    # the command's --workers path (the running Ray is reused)
    assert run_cli("neurons", store.url, "--layer", LAYER, "--reference-preprocessing", "--workers", "2",
                   "--no-accuracy") == 0
    assert "dictionary reference" in capsys.readouterr().out
    np.testing.assert_array_equal(store.read_result(f"reductions/omp/layer_{LAYER}/support"), local.support)


# ----------------------------------------------------------------------------------------------
# The command


def test_neurons_command(store, tmp_path, capsys):
    parquet, js = tmp_path / "n.parquet", tmp_path / "n.json"
    code = run_cli("neurons", store.url, "--layer", LAYER, "--task", "shapes", "--m", "10", "--top", "3",
                   "--neurons", "7,0,30", "--parquet", parquet, "--json", js)
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("layer 1: 256 neurons, pool shapes-all (50 texts), m = 4, 8, 10, 16, 32, 50")
    assert lines[1].startswith("neuron 7 (PC1 explains") and lines[2].startswith("neuron 0 (")
    assert f"+'{get_pool('shapes-all').texts[TEXT_OF_NEURON_0]}'" in lines[2]
    assert "PC1 (r̂ = r)" in out and "m = 10" in out
    table = pq.read_table(parquet)
    assert table.column("neuron").to_pylist()[:3] == [7, 7, 7] and set(table.column("neuron").to_pylist()) == {0, 7, 30}
    assert json.loads(js.read_text()) == table.to_pylist()
    assert store.read_result(f"reductions/omp/layer_{LAYER}/accuracy").shape == (6,)

    # --top-neurons ranks by the stored mean norm
    assert run_cli("neurons", store.url, "--layer", LAYER, "--top-neurons", "3", "--no-accuracy") == 0
    shown = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("neuron ")]
    norms = store.read_result(f"reductions/second_order/layer_{LAYER}/norm_mean")
    assert shown == [str(n) for n in np.argsort(-norms, kind="stable")[:3]]

    # without pc_explained and norm_mean: the first neurons, no explained variance
    store.delete_results(f"reductions/second_order/layer_{LAYER}/pc_explained")
    store.delete_results(f"reductions/second_order/layer_{LAYER}/norm_mean")
    assert run_cli("neurons", store.url, "--layer", LAYER, "--no-accuracy", "--m", "4") == 0
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("neuron ")]
    assert [line.split()[1].rstrip(":") for line in shown] == [str(n) for n in range(10)]
    assert shown[7].startswith("neuron 7 (residual ") and "PC1" not in "".join(shown)


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipscope neurons: error: "), lines
    return lines[0]


@pytest.mark.parametrize("flags,message", [
    (["--pool", "shapes-everything"], "unknown"),
    (["--m", "0"], "--m must be in 1..50 (the pool 'shapes-all' has 50 texts), got 0"),
    (["--m", "51"], "--m must be in 1..50"),
    (["--top", "0"], "--top must be an integer ≥ 1, got 0"),
    (["--neurons", "3,x"], "--neurons must be comma-separated integers"),
    (["--neurons", "256"], "--neurons must lie in 0..255, got 256"),
    (["--task", "shapes-everything"], "unknown zero-shot task"),
    (["--top-neurons", "0"], "--top-neurons must be an integer ≥ 1, got 0"),
    (["--workers", "0"], "--workers must be an integer ≥ 1, got 0"),
])
def test_bad_flags_exit_2(store, capsys, flags, message):
    assert run_cli("neurons", store.url, "--layer", LAYER, *flags) == 2
    assert message in one_error_line(capsys)


def test_missing_pcs_and_norms_exit_2(store, capsys):
    store.delete_results(f"reductions/second_order/layer_{LAYER}/norm_mean")
    assert run_cli("neurons", store.url, "--layer", LAYER, "--top-neurons", "3", "--no-accuracy") == 2
    assert f"run `clipscope second-order {store.url} --layer 1`" in one_error_line(capsys)
    store.delete_results("reductions/second_order")
    assert run_cli("neurons", store.url, "--layer", LAYER) == 2
    line = one_error_line(capsys)
    assert f"has no reductions/second_order/layer_1/pc; run `clipscope second-order {store.url} --layer 1`" in line
