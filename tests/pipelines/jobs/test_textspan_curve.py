"""The TextSpan reconstruction curve against a brute force that reads the whole store, ablates every
other direct term literally and projects each head with least squares; Ray equals local; picks that
span a head's space reproduce the unprojected head; errors name the flag to change."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr
from PIL import Image

from clipscope.errors import ConfigError
from clipscope.pipelines.jobs import textspan as textspan_job
from clipscope.pipelines.jobs.textspan import TextSpanSettings
from clipscope.pipelines.jobs.textspan import curve as curve_job
from clipscope.pipelines.texts.embedding_cache import embeddings_key
from clipscope.pipelines.texts.zero_shot import ZeroShotTask
from clipscope.storage.layout import ArraySpec
from clipscope.storage.store import RunStore

from extract_helpers import run_cli

D, N_LAYERS, N_HEADS, N_CLASSES, N_TEXTS = 8, 3, 3, 5, 30
N_ROWS, ROWS_PER_CHUNK = 160, 16
MODEL = {"name": "synthetic"}
POOL = [f"text {i}" for i in range(N_TEXTS)]


def _prefix(name: str) -> str:
    return f"a {name}"


def _suffix(name: str) -> str:
    return f"{name}, a picture"


TASK = ZeroShotTask("synthetic", tuple(f"class {c}" for c in range(N_CLASSES)), (_prefix, _suffix))


def _cache_texts(store: RunStore, texts: list[str], embeddings: np.ndarray) -> None:
    name = f"text_embeddings/{embeddings_key(texts, MODEL)}/embeddings"
    store.write_result(name, embeddings.astype(np.float32), ("text", "embed"))


def make_store(url: str, seed: int, *, subspace: int | None = None) -> RunStore:
    """Every direct term with its own mean and scale; image_embedding their exact sum; labels from a noisy
    zero-shot of the image itself, some valid rows unlabelled. With `subspace`, every head of layers 1 and 2
    lies in one `subspace`-dimensional space S and the pool is texts inside S and texts orthogonal to it."""
    rng = np.random.default_rng(seed)

    def term(*shape):
        return rng.normal(size=shape) * rng.uniform(0.3, 2.0, size=shape[1:]) + rng.normal(size=shape[1:])

    heads = term(N_ROWS, N_LAYERS, N_HEADS, D)
    texts = rng.normal(size=(N_TEXTS, D))
    if subspace is not None:
        basis, _ = np.linalg.qr(rng.normal(size=(D, D)))
        inside, outside = basis[:, :subspace], basis[:, subspace:]
        heads[:, 1:] = heads[:, 1:, :, :subspace] @ inside.T
        texts[: N_TEXTS // 2] = texts[: N_TEXTS // 2, :subspace] @ inside.T
        texts[N_TEXTS // 2:] = texts[N_TEXTS // 2:, : D - subspace] @ outside.T
    terms = {"direct/embedding": term(N_ROWS, D), "direct/mlps": term(N_ROWS, N_LAYERS, D),
             "direct/heads": heads, "direct/bias": term(N_ROWS, D)}
    terms = {k: v.astype(np.float32) for k, v in terms.items()}
    image = sum(v.astype(np.float64).reshape(N_ROWS, -1, D).sum(1) for v in terms.values())
    data = {**terms, "image_embedding": image.astype(np.float32)}
    specs = [ArraySpec(name, ("sample", *dims), value.shape[1:], "float32") for (name, value), dims in zip(
        data.items(), [("embed",), ("layer", "embed"), ("layer", "head", "embed"), ("embed",), ("embed",)])]
    attrs = {"layers": {"heads": list(range(N_LAYERS)), "mlps": list(range(N_LAYERS))}, "model": MODEL}
    store = RunStore.create(url, arrays=specs, n_rows=N_ROWS, rows_per_chunk=ROWS_PER_CHUNK, attrs=attrs)
    valid = rng.random(N_ROWS) < 0.85
    store.write_rows(0, data, valid)
    prompts = rng.normal(size=(len(TASK.prompts), D))
    prompts /= np.linalg.norm(prompts, axis=1, keepdims=True)
    _cache_texts(store, TASK.prompts, prompts)
    _cache_texts(store, POOL, texts / np.linalg.norm(texts, axis=1, keepdims=True))
    unit = image / np.linalg.norm(image, axis=1, keepdims=True)
    labels = np.argmax(unit @ class_weights(store) + 0.4 * rng.normal(size=(N_ROWS, N_CLASSES)), axis=1)
    labels[rng.random(N_ROWS) < 0.1] = -1
    store.write_samples_part(0, [{"row": r, "key": f"k{r:03d}", "shard": "synthetic.tar", "label": int(labels[r])}
                                 for r in range(N_ROWS) if valid[r]])
    store.merge_samples()
    return store


def class_weights(store: RunStore) -> np.ndarray:
    """[embed class] per class the mean of its unit prompt embeddings, normalised (open_clip's rule)."""
    prompts = store.read_result(f"text_embeddings/{embeddings_key(TASK.prompts, MODEL)}/embeddings")
    per_class = prompts.astype(np.float64).reshape(N_CLASSES, len(TASK.templates), D).mean(1)
    return (per_class / np.linalg.norm(per_class, axis=1, keepdims=True)).T


def brute_force(url: str, layers: list[int], sizes: list[int], normalize: bool) -> dict:
    """The whole store in memory; every other term mean-ablated one by one; lstsq projections."""
    group = zarr.open_group(url, mode="r")
    read = lambda name: np.asarray(group[name][...]).astype(np.float64)  # noqa: E731
    valid = np.asarray(group["valid"][...])
    store = RunStore.open(url)
    samples = store.read_samples().to_pydict()
    labels = np.full(N_ROWS, -1)
    labels[samples["row"]] = samples["label"]
    scored = valid & (labels >= 0)
    image = read("image_embedding")
    scale = np.linalg.norm(image, axis=1) if normalize else np.ones(N_ROWS)
    raw_heads = read("direct/heads")
    others = [read("direct/embedding"), read("direct/bias"), *np.moveaxis(read("direct/mlps"), 1, 0)]
    others += [raw_heads[:, l, h] for l in range(N_LAYERS) for h in range(N_HEADS) if l not in layers]
    ablated = sum((o / scale[:, None])[valid].mean(0) for o in others)
    heads = raw_heads / scale[:, None, None, None]
    texts = store.read_result(f"text_embeddings/{embeddings_key(POOL, MODEL)}/embeddings").astype(np.float64)
    weights = class_weights(store)

    def acc(emb):
        return float((np.argmax(emb[scored] @ weights, axis=1) == labels[scored]).mean())

    curve = []
    for m in sizes:
        emb = np.tile(ablated, (N_ROWS, 1))
        for l in layers:
            picks = store.read_result(f"reductions/textspan/layer_{l}/indices")
            for h in range(N_HEADS):
                basis = texts[picks[h, :m]].T  # [embed m]
                coef, *_ = np.linalg.lstsq(basis, heads[:, l, h].T, rcond=None)
                emb += (basis @ coef).T
        curve.append(acc(emb))
    kept = ablated + heads[:, layers].sum((1, 2))
    return {"curve": curve, "baseline": acc(image), "heads_kept": acc(kept), "n": int(scored.sum())}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_store(str(tmp_path_factory.mktemp("curve") / "store.zarr"), seed=0)


@pytest.mark.parametrize("normalize", [True, False])
def test_curve_equals_brute_force(synthetic, normalize):
    layers, sizes = [1, 2], [1, 2, 3, 5, 8]
    textspan_job.run(synthetic, TextSpanSettings(layers=tuple(layers), texts=tuple(POOL), basis_size=8, span_rank=8,
                                                  normalize=normalize))
    settings = curve_job.Settings(layers=tuple(layers), task=TASK, basis_sizes=(8, 3, 1, 5, 2, 3))
    result = curve_job.run(synthetic, settings)
    ref = brute_force(synthetic.url, layers, sizes, normalize)
    assert result.basis_sizes == tuple(sizes) and result.normalize == normalize
    assert result.n_labelled == ref["n"] > 100
    np.testing.assert_array_equal(result.accuracies, ref["curve"])
    assert result.baseline_accuracy == ref["baseline"] and result.heads_kept_accuracy == ref["heads_kept"]
    # Not vacuous: the curve moves with m, ablation costs accuracy, and m = D (the picks span all of
    # R^D) is the unprojected heads.
    assert len(set(ref["curve"])) >= 3 and ref["heads_kept"] < ref["baseline"]
    assert result.accuracies[-1] == result.heads_kept_accuracy
    stored = synthetic.read_result("reductions/textspan/curve/synthetic/accuracy")
    np.testing.assert_array_equal(stored, result.accuracies)
    assert synthetic.read_result("reductions/textspan/curve/synthetic/basis_size").tolist() == sizes
    assert synthetic.dims("reductions/textspan/curve/synthetic/accuracy") == ("basis_size",)
    attrs = synthetic.array("reductions/textspan/curve/synthetic/accuracy").attrs
    assert attrs["baseline_accuracy"] == ref["baseline"] and attrs["layers"] == layers


def test_ray_equals_local(synthetic):
    from clipscope.cluster.executor import open_executor

    textspan_job.run(synthetic, TextSpanSettings(layers=(0, 2), texts=tuple(POOL), basis_size=6, span_rank=8))
    local = curve_job.run(synthetic, curve_job.Settings(layers=(0, 2), task=TASK, basis_sizes=(2, 4, 6)))
    with open_executor(2, object_store_memory=100 * 1024 * 1024, progress="off") as on_ray:
        remote = curve_job.run(synthetic, curve_job.Settings(layers=(0, 2), task=TASK, basis_sizes=(2, 4, 6)), on_ray)
    np.testing.assert_array_equal(remote.accuracies, local.accuracies)
    assert (remote.baseline_accuracy, remote.heads_kept_accuracy, remote.n_labelled) == \
        (local.baseline_accuracy, local.heads_kept_accuracy, local.n_labelled)


def test_picks_spanning_the_heads_space_reproduce_the_heads(tmp_path):
    store = make_store(str(tmp_path / "sub.zarr"), seed=1, subspace=3)
    textspan_job.run(store, TextSpanSettings(layers=(1, 2), texts=tuple(POOL), basis_size=3, span_rank=3))
    texts = store.read_result(f"text_embeddings/{embeddings_key(POOL, MODEL)}/embeddings")
    for layer in (1, 2):
        picks = store.read_result(f"reductions/textspan/layer_{layer}/indices")
        assert (picks < N_TEXTS // 2).all()  # the construction: all three picks lie inside S
        assert np.linalg.matrix_rank(texts[picks[0]].astype(np.float64), tol=1e-4) == 3
    result = curve_job.run(store, curve_job.Settings(layers=(1, 2), task=TASK, basis_sizes=(1, 2, 3)))
    ref = brute_force(store.url, [1, 2], [1, 2, 3], True)
    np.testing.assert_array_equal(result.accuracies, ref["curve"])
    assert result.accuracies[-1] == result.heads_kept_accuracy == ref["heads_kept"]
    assert result.accuracies[0] != result.heads_kept_accuracy  # one text per head is not enough


def test_too_few_picks_names_basis_size(synthetic):
    textspan_job.run(synthetic, TextSpanSettings(layers=(2,), texts=tuple(POOL), basis_size=4, span_rank=8))
    with pytest.raises(ConfigError, match=r"holds 4 picks per head but the curve needs 6; rerun textspan with "
                                          r"--basis-size 6"):
        curve_job.run(synthetic, curve_job.Settings(layers=(2,), task=TASK, basis_sizes=(2, 6)))
    with pytest.raises(ConfigError, match="no TextSpan results for layer 9"):
        curve_job.run(synthetic, curve_job.Settings(layers=(2, 9), task=TASK, basis_sizes=(2,)))
    with pytest.raises(ConfigError, match="another text pool"):
        curve_job.run(synthetic, curve_job.Settings(layers=(2,), texts=tuple(POOL[:-1]), task=TASK, basis_sizes=(2,)))
    with pytest.raises(ConfigError, match="^basis_sizes must be integers ≥ 1"):
        curve_job.run(synthetic, curve_job.Settings(layers=(2,), task=TASK, basis_sizes=(0, 2)))


def test_layers_searched_separately_with_other_settings_are_refused(synthetic):
    textspan_job.run(synthetic, TextSpanSettings(layers=(0,), texts=tuple(POOL), basis_size=2, span_rank=8,
                                                 normalize=False))
    textspan_job.run(synthetic, TextSpanSettings(layers=(1,), texts=tuple(POOL), basis_size=2, span_rank=8,
                                                 normalize=True))
    with pytest.raises(ConfigError, match="different pools or normalisation"):
        curve_job.run(synthetic, curve_job.Settings(layers=(0, 1), task=TASK, basis_sizes=(2,)))


def test_cli_curve_writes_store_and_plot(split_store, tmp_path, capsys, fast_models):
    url = str(tmp_path / "store.zarr")
    shutil.copytree(split_store, url)
    plot = tmp_path / "curve.png"
    code = run_cli("textspan", url, "--layers", "2", "3", "--pool", "shapes-all", "-m", "6", "--span-rank", "16",
                   "--curve", "--curve-sizes", "2", "4", "6", "--task", "shapes-shape", "--plot", plot)
    out = capsys.readouterr().out
    assert code == 0, out
    store = RunStore.open(url)
    stored = store.read_result("reductions/textspan/curve/shapes-shape/accuracy")
    assert stored.shape == (3,) and ((0 <= stored) & (stored <= 1)).all()
    assert "m=2" in out and "full model:" in out
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size[0] > 100
    ref = curve_job.run(store, curve_job.Settings(layers=(2, 3), task="shapes-shape", basis_sizes=(2, 4, 6)))
    np.testing.assert_array_equal(ref.accuracies, stored)


def test_cli_curve_larger_than_basis_size_is_one_line(split_store, tmp_path, capsys):
    code = run_cli("textspan", split_store, "-m", "4", "--curve", "--curve-sizes", "2", "8")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--curve needs --basis-size ≥ the largest of --curve-sizes (8), got 4" in err
