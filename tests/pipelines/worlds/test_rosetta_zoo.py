"""The offline Rosetta zoo (S3): the oracle's maps are the world's truth; the shipped CNN; the meaning gates
R1–R4 on the shipped models (thresholds measured once on this zoo — 300 images of world seed 5 — then frozen;
tests/../README "Rosetta Neurons" lists the measurements)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipscope.pipelines.worlds.shapes import world
from clipscope.pipelines.worlds.shapes.cnn import CNN_CHECKPOINT, accuracy, shapes_cnn, shapes_cnn_random
from clipscope.pipelines.worlds.shapes.oracle import CONCEPTS, OFFSETS, oracle, truth_maps
from clipscope.pipelines.worlds.shapes.train import content_digest


def test_oracle_maps_are_area_downsampled_truth(tmp_path):
    from clipscope.pipelines.jobs.maps.job import run_maps
    from clipscope.pipelines.jobs.maps.settings import MapsConfig
    from clipscope.storage.store import RunStore

    world.write_world(tmp_path / "data", 1, 6, 3)
    config = MapsConfig(data=(str(tmp_path / "data"),), out=str(tmp_path / "o.zarr"), zoo="shapes-oracle",
                        geometry=48, rows_per_chunk=8, dtype="float32")
    run_maps(config, progress_display="off")
    store = RunStore.open(config.out, "r")
    assert store.attrs["maps"]["layers"] == list(oracle().layers)
    for row, scene in enumerate(world.generate_scenes(6, 3)):
        truth = torch.from_numpy(truth_maps(scene.mask, [vars(o) for o in scene.objects]))
        colour = store.read("maps/colour_12/values", [row])[0]
        expected = F.avg_pool2d(truth[None, OFFSETS["colour"][0]:OFFSETS["colour"][1]], 4)[0].numpy()
        np.testing.assert_allclose(colour, expected, atol=1e-6)
        main = scene.objects[0]
        c = list(world.COLOURS).index(main.colour)
        assert colour[c].sum() * 16 >= main.area - 1e-3  # the main object's pixels are in its colour's unit
        obj = store.read("maps/object_24/values", [row])[0, 0]
        assert abs(obj.sum() * 4 - (scene.mask > 0).sum()) < 1e-3
    assert len(CONCEPTS["colour"]) == 8


def test_the_shipped_cnn_is_small_trained_and_its_random_control_is_not():
    assert CNN_CHECKPOINT.stat().st_size < 1_000_000
    assert len(content_digest(CNN_CHECKPOINT)) == 64
    trained = accuracy(shapes_cnn().module, n=200)
    random = accuracy(shapes_cnn_random(seed=1).module, n=200)
    # measured on 500 held-out scenes: colour 0.878, shape 0.842, cell 0.854
    assert trained["colour"] >= 0.8 and trained["shape"] >= 0.75 and trained["cell"] >= 0.75, trained
    assert max(random.values()) < 0.4, random


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from clipscope.pipelines.worlds.shapes.rosetta_zoo import build_zoo

    folder = tmp_path_factory.mktemp("zoo")
    world.write_world(folder / "data", 3, 100, 5)
    return build_zoo(str(folder / "data"), folder, rows_per_chunk=50)


@pytest.mark.slow
def test_r1_trained_models_share_the_oracles_colour_units_and_random_ones_do_not(zoo):
    from clipscope.pipelines.worlds.shapes.rosetta_zoo import colour_buddies, colour_layers, run_pair

    numbers = {}
    for name, store in (("cnn", zoo.cnn), ("cnn_random", zoo.cnn_random), ("clip", zoo.clip),
                        ("clip_random", zoo.clip_random)):
        result = run_pair(zoo.oracle, store, f"r1-{name}", colour_layers())
        numbers[name] = (colour_buddies(result, 0.4)[0], colour_buddies(result, 0.0)[1])
    print("R1", numbers)
    # frozen from the first measurement (count of the 8 colour units with a buddy r ≥ 0.4, best buddy r)
    assert numbers["cnn"][0] >= 6 and numbers["cnn_random"][0] <= 2, numbers
    assert numbers["cnn_random"][1] < numbers["cnn"][1] - 0.1, numbers


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured: a random-init shapes CLIP's MLP units match the oracle's colour "
                                       "units as well as the trained one's (colour is linear in the pixels); R1 "
                                       "does not hold for the CLIP — reported, not loosened")
def test_r1_for_the_shapes_clip(zoo):
    from clipscope.pipelines.worlds.shapes.rosetta_zoo import colour_buddies, colour_layers, run_pair

    trained = run_pair(zoo.oracle, zoo.clip, "r1c", colour_layers())
    random = run_pair(zoo.oracle, zoo.clip_random, "r1cr", colour_layers())
    assert colour_buddies(trained, 0.4)[0] >= 6 and colour_buddies(random, 0.4)[0] <= 2


@pytest.mark.slow
def test_r2_trained_pairs_have_more_and_stronger_buddies_than_trained_random_pairs(zoo):
    from clipscope.pipelines.worlds.shapes.rosetta_zoo import buddy_stats, run_pair

    trained = buddy_stats(run_pair(zoo.clip, zoo.cnn, "r2"))
    controls = [buddy_stats(run_pair(zoo.clip, zoo.cnn_random, "r2-cnn-random")),
                buddy_stats(run_pair(zoo.clip_random, zoo.cnn, "r2-clip-random"))]
    print("R2", trained, controls)
    # measured: (408, 0.302) vs (368, 0.282) and (246, 0.229); frozen margins: 20 buddies, 0.01 mean r
    for count, mean in controls:
        assert trained[0] >= count + 20 and trained[1] >= mean + 0.01, (trained, controls)


@pytest.mark.slow
def test_r3_r4_colour_concepts_are_tuples_with_right_examples_and_synonyms_cluster(zoo):
    from clipscope.pipelines.jobs import rosetta
    from clipscope.pipelines.worlds.shapes.rosetta_zoo import (
        SELF_K,
        colour_concepts,
        colour_layers,
        example_precision,
        same_colour_concepts,
    )
    from clipscope.storage.store import RunStore

    settings = rosetta.Settings(others=(zoo.clip, zoo.cnn), name="r3", layers=(colour_layers((6, 12, 24)), (), ()),
                                self_k=SELF_K)
    result = rosetta.run(RunStore.open(zoo.oracle, "r+"), settings)
    concepts = colour_concepts(result)
    hits, total = example_precision(result, RunStore.open(zoo.oracle, "r"))
    together, present = same_colour_concepts(result)
    print("R3/R4", concepts, hits, total, together, present)
    # R3: every colour appears in a tuple, in a concept of its own; ≥ 90 % of the examples show the colour
    assert sorted(concepts) == sorted(world.COLOURS)
    assert len({c for cs in concepts.values() for c in cs}) == 8 and all(len(cs) == 1 for cs in concepts.values())
    assert total >= 48 and hits >= 0.9 * total
    # R4: the three grids of each colour end in one concept
    assert together == present == 8


def test_cli_end_to_end_on_a_small_zoo_with_the_dictionary_png_and_queries(tmp_path, capsys):
    from PIL import Image

    from clipscope.pipelines import cli

    world.write_world(tmp_path / "data", 2, 10, 4)
    data = str(tmp_path / "data")
    for name, zoo in (("oracle", "shapes-oracle"), ("cnn", "shapes-cnn")):
        assert cli.main(["maps", data, "--out", str(tmp_path / f"{name}.zarr"), "--zoo", zoo, "--geometry", "48",
                         "--rows-per-chunk", "8", "--unit-chunk", "8", "--progress", "off"]) == 0
    oracle, cnn, png = str(tmp_path / "oracle.zarr"), str(tmp_path / "cnn.zarr"), tmp_path / "dict.png"
    capsys.readouterr()
    assert cli.main(["rosetta", oracle, cnn, "--layers", f"{oracle}=colour_6,colour_12", "--self-k", "1",
                     "--examples", "3", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "m1 (shapes-cnn)" in out and "tiles:" in out and "concept 0" in out
    with Image.open(png) as image:
        assert min(image.size) >= 100
    assert cli.main(["query", oracle, "rosetta", "concepts"]) == 0
    assert "concept 0" in capsys.readouterr().out
    assert cli.main(["query", oracle, "rosetta", "concept", "0"]) == 0
    assert "example row" in capsys.readouterr().out
    assert cli.main(["query", oracle, "rosetta", "unit", "anchor:colour_6:0"]) == 0
    assert cli.main(["query", oracle, "rosetta", "unit", "nope:x:1"]) == 2
