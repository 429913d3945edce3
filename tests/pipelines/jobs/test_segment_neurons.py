"""Neuron segmentation (the neuron methods of `clipscope segment`): the selected neurons and the heat maps equal
literal loops over the stored PCs and activations (flat over two layers, the random baseline seeded), and the
segment job runs them end to end."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from clipscope.errors import ConfigError, StoreError
from clipscope.pipelines.jobs import second_order, segment
from clipscope.pipelines.jobs.segment import neurons as neuron_methods
from clipscope.pipelines.jobs.segment.job import grid_and_size
from clipscope.pipelines.jobs.segment.methods import Context, get_method
from clipscope.pipelines.texts.zero_shot import classifier, get_task, store_classes
from clipscope.pipelines.worlds.shapes.world import write_world
from clipscope.storage.store import RunStore

from extract_helpers import extract_args, run_cli

LAYERS = (1, 2)


@pytest.fixture(scope="module")
def masked(tmp_path_factory, fast_models) -> str:
    folder = tmp_path_factory.mktemp("segn")
    write_world(folder / "shards", 2, 8, seed=9)
    out = folder / "store.zarr"
    assert run_cli(*extract_args(str(folder / "shards" / "shapes-{00000..00001}.tar"), out, "--masks",
                                 "--activation-layers", *LAYERS, "--second-order-layers", *LAYERS)) == 0
    store = RunStore.open(str(out), "r+")
    for layer in LAYERS:
        second_order.run(store, second_order.Settings(layer=layer, top_k=4))
    return str(out)


@pytest.fixture
def store(masked, tmp_path) -> RunStore:
    shutil.copytree(masked, tmp_path / "copy.zarr")
    return RunStore.open(str(tmp_path / "copy.zarr"), "r+")


def literal_selection(pcs, weights, top):
    out = []
    for c in range(weights.shape[1]):
        scores = [abs(float(pcs[n] @ weights[:, c])) for n in range(len(pcs))]
        out.append(sorted(range(len(pcs)), key=lambda n: (-scores[n], n))[:top])
    return np.array(out)


def literal_centred(weights):
    """w_c − w̄ by loops: each class direction minus the mean over the classes."""
    n_classes = weights.shape[1]
    mean = [sum(weights[e, c] for c in range(n_classes)) / n_classes for e in range(weights.shape[0])]
    return np.array([[weights[e, c] - mean[e] for c in range(n_classes)] for e in range(weights.shape[0])])


@pytest.mark.parametrize("method, centre", [("neurons", False), ("neurons", True), ("neurons-random", False)])
def test_heat_equals_a_loop(store, method, centre):
    settings = segment.Settings(method=method, layers=LAYERS, top_neurons=7, seed=3, task="shapes",
                                centre_classes=centre)
    weights = classifier(store, get_task("shapes")).astype(np.float64)
    classes = store_classes(store, get_task("shapes"))
    grid, size = grid_and_size(store)
    rows = slice(0, 8)
    heat = get_method(method).heat(store, rows, Context(settings, classes[rows], weights, grid, size))
    pcs = np.concatenate([store.read_result(f"reductions/second_order/layer_{l}/pc") for l in LAYERS])
    if method == "neurons":
        chosen = literal_selection(pcs, literal_centred(weights) if centre else weights, 7)
    else:
        chosen = np.stack([np.random.default_rng([3, c]).choice(len(pcs), 7, replace=False) for c in range(56)])
    acts = [store.read(f"activations/layer_{l}").astype(np.float64) for l in LAYERS]
    width = acts[0].shape[2]
    for r in range(8):
        c = max(int(classes[r]), 0)
        expected = np.zeros(grid[0] * grid[1])
        for n in chosen[c]:
            expected += acts[n // width][r, 1:, n % width]
        np.testing.assert_allclose(heat[r].ravel(), expected / 7, rtol=1e-12, atol=1e-14)


def test_the_chosen_neurons_are_stored_with_how_they_were_chosen(store):
    weights = classifier(store, get_task("shapes")).astype(np.float64)
    pcs = np.concatenate([store.read_result(f"reductions/second_order/layer_{l}/pc") for l in LAYERS])
    for centre in (False, True):
        settings = segment.Settings(method="neurons", task="shapes", top_neurons=5, centre_classes=centre,
                                    force=True)
        result = segment.run(store, settings)
        expected = literal_selection(pcs, literal_centred(weights) if centre else weights, 5)
        np.testing.assert_array_equal(result.selected, expected)
        assert result.selection == {"layers": list(LAYERS), "offsets": [0, 256], "random": False,
                                    "centre_classes": centre}
        back = segment.Result.read(store, settings)
        np.testing.assert_array_equal(back.selected, expected)
        assert store.dims("reductions/segmentation/neurons/shapes/selected") == ("class", "rank")
    assert not np.array_equal(literal_selection(pcs, weights, 5), literal_selection(pcs, literal_centred(weights), 5))
    tokens = segment.run(store, segment.Settings(method="random", task="shapes"))
    assert tokens.selected is None


def test_segment_job_runs_the_methods(store):
    for method in ("neurons", "neurons-random"):
        result = segment.run(store, segment.Settings(method=method, task="shapes", class_mode="label", target="main",
                                                     top_neurons=10))
        assert 0 <= result.miou <= 1 and result.n == int(store.read_valid().sum())
    with pytest.raises(ConfigError, match="top_neurons must be ≤ the 512 neurons"):
        segment.run(store, segment.Settings(method="neurons", task="shapes", top_neurons=600))
    with pytest.raises(StoreError, match="needs activations/layer_0"):
        segment.run(store, segment.Settings(method="neurons", task="shapes", layers=(0,)))
    assert neuron_methods.neuron_layers(store, segment.Settings(method="neurons")) == LAYERS


def test_segment_cli_with_the_neuron_methods(store, tmp_path, capsys):
    assert run_cli("segment", store.url, "--method", "neurons", "neurons-random", "--task", "shapes", "--class",
                   "label", "--target", "main", "--layers", "1", "2", "--top-neurons", "10", "--centre-classes",
                   "--png", tmp_path / "overlay.png") == 0
    out = capsys.readouterr().out
    assert "neurons" in out and "neurons-random" in out
    assert (tmp_path / "overlay.png").stat().st_size > 0
    assert RunStore.open(store.url).result_group_attrs("reductions/segmentation/neurons/shapes")["selection"][
        "centre_classes"] is True


def test_a_fresh_process_knows_the_neuron_methods():
    """The CLI and every Ray worker import only the segment package; the neuron methods must come with it."""
    import subprocess
    import sys

    code = ("from clipscope.pipelines.jobs.segment.methods import list_methods; "
            "print(' '.join(list_methods()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert {"neurons", "neurons-random", "tokens", "attention", "random"} <= set(out)
