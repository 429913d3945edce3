"""The offline cue-mining loop: planned scenes render what the plan says, cue words become scene content as
documented, and the loop runs end to end on a tiny store (its rates are those of the literal rule)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from clipscope.pipelines.jobs import cues, neurons, second_order
from clipscope.pipelines.texts.pools import get_pool
from clipscope.pipelines.worlds.shapes import world
from clipscope.pipelines.worlds.shapes.cue_loop import cue_plan, format_outcomes, run_pair, vocabulary
from clipscope.pipelines.worlds.shapes.probes import encode_images
from clipscope.pipelines.worlds.shapes.spurious import render_plan, spurious_scene
from clipscope.storage.store import RunStore


def test_render_plan_draws_the_plan():
    plan = [{"shape": "heart", "colour": "blue", "size": "large", "cell": 4},
            {"shape": "star", "colour": "red", "size": "small", "cell": 0}]
    scene = render_plan(plan, 3, 5)
    assert [(o.shape, o.colour, o.size, o.position) for o in scene.objects] == [
        ("heart", "blue", "large", "center"), ("star", "red", "small", "top left")]
    assert scene.label == list(world.COLOURS).index("blue") * 7 + world.SHAPES.index("heart")
    assert (scene.mask == 1).sum() > (scene.mask == 2).sum() > 0
    main = scene.image[scene.mask == 1].mean(0)
    assert main[2] > main[0] + 60  # blue
    assert np.array_equal(render_plan(plan, 3, 5).image, scene.image)  # a pure function of (plan, seed, index)
    groups = [spurious_scene(i, 1)[1:] for i in range(4)]
    assert groups == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_cue_words_become_scene_content():
    rng = np.random.default_rng(0)
    plan = cue_plan("star", ["purple", "large", "bottom left", "circle", "green"], rng, avoid=("heart",))
    assert plan[0] == {"shape": "star", "colour": "purple", "size": "large", "cell": 6}
    assert plan[1]["shape"] == "circle" and plan[1]["colour"] == "green" and len(plan) == 2
    plan = cue_plan("star", ["three shapes"], rng, avoid=("heart",))
    assert len(plan) == 3 and all(o["shape"] != "heart" for o in plan[1:])
    assert len({o["cell"] for o in plan}) == 3
    vocab = vocabulary("star", "heart")
    assert "heart" not in vocab and "star" not in vocab and {"red", "small", "top left", "two shapes"} <= set(vocab)


@pytest.fixture(scope="module")
def reduced(split_store, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cueloop") / "store.zarr"
    shutil.copytree(split_store, path)
    store = RunStore.open(str(path), "r+")
    second_order.run(store, second_order.Settings(layer=1, top_k=5))
    pool = get_pool("shapes-all")
    neurons.run(store, neurons.Settings(layer=1, texts=tuple(pool.texts), pool_name=pool.name, m=(2, 4),
                                        accuracy=False))
    return str(path)


def test_loop_runs_and_counts_the_reference_rule(reduced, model_cache):
    store = RunStore.open(reduced, "r+")
    loaded = model_cache("clipscope-tiny")
    outcome = run_pair(store, loaded, "star", "heart", layers=(1,), words=3, neurons=10, scenes=6)
    assert len(outcome.mined) <= 3 and set(outcome.mined) <= set(vocabulary("star", "heart"))
    v = cues.cue_direction_of(store, "star", "heart", loaded=loaded)
    plan_rng = np.random.default_rng([0, 2])
    plans = [cue_plan("star", outcome.mined, plan_rng, avoid=("heart",)) for _ in range(6)]
    config = world.WorldConfig(image_size=64)
    images = np.stack([render_plan(p, 0, i, config).image for i, p in enumerate(plans)])
    emb = encode_images(loaded, images).to(torch.float64).numpy()
    assert outcome.rates["mined"] == float((emb @ v > 0).mean())
    assert "mined words" in format_outcomes([outcome])
