"""`clipscope segment` (spec S7): per-row counts and AP equal a brute-force numpy/sklearn computation over several
row blocks; the store job reproduces the shapes evaluation's segmentation numbers exactly when configured the same;
methods come from a registry; the CLI prints the table and refuses a store without masks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from clipscope.errors import ConfigError, StoreError
from clipscope.pipelines.jobs import segment
from clipscope.pipelines.jobs.segment.methods import Method, get_method, list_methods, register_method
from clipscope.storage.store import RunStore

from extract_helpers import extract_args, run_cli
from masked_helpers import write_masked_shards


@pytest.fixture(scope="module")
def masked_store(tmp_path_factory, fast_models):
    folder, _, _ = write_masked_shards(tmp_path_factory.mktemp("seg") / "shards", counts=(6, 7), seed=3)
    url = str(tmp_path_factory.mktemp("seg-store") / "store.zarr")
    assert run_cli(*extract_args(folder, url, "--masks", "--token-sum", "--attention-layers", "3")) == 0
    return url


def brute_force(store: RunStore, weights: np.ndarray, clip: bool, source: str) -> dict[str, np.ndarray]:
    """Row by row with numpy, sklearn and torch's bilinear upsampling: the protocol as written in the spec.

    The patch map is checked against the method's own to 1e-12 and then the method's is used: bilinear
    upsampling makes values that are equal in exact arithmetic, and an ulp of difference splits such a tie
    into two thresholds, which moves AP in the fifth digit."""
    from clipscope.pipelines.jobs.segment.methods import Context, get_method

    valid, masks = store.read_valid(), store.read("masks")
    emb = store.read("image_embedding").astype(np.float64)
    out = {"class_index": [], "correct": [], "labelled": [], "intersection": [], "union": [], "ap": []}
    for row in range(store.n_rows):
        labelled = masks[row] != 255
        if not valid[row] or not labelled.any():
            for key, empty in (("class_index", -1), ("correct", 0), ("labelled", 0), ("intersection", [0, 0]),
                               ("union", [0, 0]), ("ap", np.nan)):
                out[key].append(empty)
            continue
        c = int(np.argmax(emb[row] @ weights))
        if source == "tokens":
            tokens = store.read("direct/token_sum", [row])[0].astype(np.float64)[1:]
            grid = (tokens @ (weights[:, c] - weights.mean(1))).reshape(4, 4)
        else:
            grid = store.read("attention/layer_3", [row])[0].astype(np.float64).mean(0)[1:].reshape(4, 4)
        context = Context(None, np.array([c]), weights, (4, 4), (64, 64))
        own = get_method(source).heat(store, slice(row, row + 1), context)[0]
        np.testing.assert_allclose(own, grid, rtol=0, atol=1e-12 * np.abs(grid).max())
        grid = own
        heat = torch.nn.functional.interpolate(torch.from_numpy(grid)[None, None], size=(64, 64), mode="bilinear",
                                               align_corners=False)[0, 0].numpy()
        if clip:
            heat = np.maximum(heat, 0)
        norm = (heat - heat.min()) / (heat.max() - heat.min())
        pred = norm > norm.mean()
        truth = (masks[row] > 0) & labelled
        out["class_index"].append(c)
        out["correct"].append(int(((pred == truth) & labelled).sum()))
        out["labelled"].append(int(labelled.sum()))
        out["intersection"].append([int((~pred & ~truth & labelled).sum()), int((pred & truth & labelled).sum())])
        out["union"].append([int(((~pred | ~truth) & labelled).sum()), int(((pred | truth) & labelled).sum())])
        h, t = norm[labelled], truth[labelled]
        out["ap"].append(average_precision_score(np.concatenate([~t, t]), np.concatenate([1 - h, h])))
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("method,clip", [("tokens", True), ("attention", False)])
def test_store_job_equals_brute_force_over_several_blocks(masked_store, method, clip, model_cache):
    from clipscope.pipelines.texts.zero_shot import classifier, get_task

    store = RunStore.open(masked_store, "r+")
    settings = segment.Settings(method=method, task="shapes-colour", block_rows=4, force=True)
    result = segment.run(store, settings, loaded=model_cache("clipscope-tiny"))
    weights = classifier(store, get_task("shapes-colour")).astype(np.float64)
    expected = brute_force(store, weights, clip, method)
    for key in ("class_index", "correct", "labelled", "intersection", "union"):
        np.testing.assert_array_equal(getattr(result, key), expected[key], err_msg=key)
    np.testing.assert_allclose(result.ap, expected["ap"], atol=1e-12)
    scored = expected["class_index"] >= 0
    assert result.n == int(scored.sum()) == 11  # two samples have no mask
    inter, union = expected["intersection"].sum(0), expected["union"].sum(0)
    assert result.pixel_acc == expected["correct"].sum() / expected["labelled"].sum()
    assert result.miou == pytest.approx(np.mean(inter / union), abs=1e-15)
    assert result.map == pytest.approx(np.mean(expected["ap"][scored]), abs=1e-12)
    # the stored group reads back, and another block size gives the same bytes
    again = segment.run(store, dataclasses.replace(settings, block_rows=16, force=True))
    assert again.ap.tobytes() == result.ap.tobytes() and np.array_equal(again.union, result.union)
    read = segment.Result.read(RunStore.open(masked_store), settings)
    assert read.metrics() == result.metrics()


def test_methods_come_from_a_registry(masked_store):
    assert {"tokens", "attention", "random"} <= set(list_methods())

    def flat(store, rows, context):
        return np.zeros((rows.stop - rows.start, *context.grid))

    register_method(Method("flat-test", flat, clip=False, threshold=0.5), replace=True)
    result = segment.run(RunStore.open(masked_store, "r+"), segment.Settings(method="flat-test", task="shapes-colour"))
    assert result.correct.sum() == (result.labelled.sum() - result.intersection[:, 1].sum()
                                    - (result.union[:, 1] - result.intersection[:, 1]).sum())
    assert (result.intersection[:, 1] == 0).all()  # a flat map has no foreground
    with pytest.raises(ConfigError, match="unknown segmentation method 'nope'"):
        get_method("nope")


def test_the_random_method_does_not_depend_on_the_blocks(masked_store):
    store = RunStore.open(masked_store, "r+")
    a = segment.run(store, segment.Settings(method="random", task="shapes-colour", block_rows=4, force=True))
    b = segment.run(store, segment.Settings(method="random", task="shapes-colour", block_rows=8, force=True))
    assert a.ap.tobytes() == b.ap.tobytes()


def test_a_store_without_masks_is_refused_naming_the_flag(split_store, capsys):
    with pytest.raises(StoreError, match="extract with --masks"):
        segment.run(RunStore.open(split_store), segment.Settings(method="random", task="shapes-colour"))
    assert run_cli("segment", split_store, "--method", "random", "--task", "shapes-colour") == 2
    assert "extract with --masks" in capsys.readouterr().err


def test_cli_prints_the_table(masked_store, capsys, tmp_path):
    assert run_cli("segment", masked_store, "--method", "tokens", "attention", "random", "--task", "shapes-colour",
                   "--png", tmp_path / "seg.png") == 0
    out = capsys.readouterr().out
    assert "pixel acc" in out and "tokens" in out and "attention" in out and "random" in out
    assert (tmp_path / "seg.png").stat().st_size > 1000


def test_shapes_evaluation_numbers_are_reproduced_exactly(tmp_path, fast_models):
    """`shapes_eval.segmentation` (label class, no clip, > mean, the main object) on the same scenes, extracted."""
    from clipscope.pipelines.worlds.shapes import world
    from clipscope.pipelines.worlds.shapes.evaluate import segmentation
    from clipscope.pipelines.worlds.shapes.train import CHECKPOINT, SHAPES_MODEL, load_shapes_model

    n = 48
    world.write_world(tmp_path / "world", 2, n // 2, 2, counts=(1,))
    url = str(tmp_path / "store.zarr")
    assert run_cli("extract", tmp_path / "world", "--out", url, "--model", SHAPES_MODEL, "--pretrained", CHECKPOINT,
                   "--masks", "--token-sum", "--attention-layers", "3", "--rows-per-chunk", "8",
                   "--progress", "off") == 0
    loaded = load_shapes_model()
    scenes = list(world.generate_scenes(n, 2, config=world.WorldConfig(counts=(1,))))
    expected = segmentation(loaded, scenes)
    store = RunStore.open(url, "r+")
    for method, name in (("tokens", "ours"), ("attention", "attention")):
        result = segment.run(store, segment.Settings(method=method, task="shapes", class_mode="label", clip=False,
                                                     threshold="mean", target="main"), loaded=loaded)
        assert result.n == n
        assert (result.pixel_acc, result.miou) == (expected[name]["pixel_acc"], expected[name]["miou"]), method


@pytest.mark.slow
def test_ray_gives_the_bytes_of_a_local_run(masked_store):
    """Segmentation and the streamed neighbours' top-k on an embedded 2-worker Ray equal the in-process run."""
    from clipscope.cluster.executor import open_executor
    from clipscope.pipelines.query import interpret

    store = RunStore.open(masked_store, "r+")
    settings = segment.Settings(method="tokens", task="shapes-colour", block_rows=4, force=True)
    local = segment.run(store, settings)
    near = interpret.head_image_neighbours(store, 3, 1, sample=0, k=6, block_rows=4)
    with open_executor(2, object_store_memory=100 * 1024 * 1024, progress="off") as on_ray:
        remote = segment.run(store, settings, on_ray)
        near_remote = interpret.head_image_neighbours(store, 3, 1, sample=0, k=6, block_rows=4, executor=on_ray)
    for key in ("class_index", "correct", "labelled", "intersection", "union", "ap"):
        assert getattr(remote, key).tobytes() == getattr(local, key).tobytes(), key
    assert near_remote.equals(near)


def test_a_rerun_is_a_no_op_that_says_so_and_force_recomputes(masked_store, caplog):
    import logging

    store = RunStore.open(masked_store, "r+")
    settings = segment.Settings(method="attention", task="shapes-colour", class_mode="predicted")
    first = segment.run(store, dataclasses.replace(settings, force=True))
    with caplog.at_level(logging.INFO):
        again = segment.run(store, settings)
    assert "is up to date" in caplog.text and again.union.tobytes() == first.union.tobytes()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        segment.run(store, dataclasses.replace(settings, force=True))
    assert "is up to date" not in caplog.text
