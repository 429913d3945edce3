"""The shapes world: determinism, planted truth (masks against a naive rasteriser), shards, CLI."""

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from PIL import Image

from clipscope.errors import ConfigError
from clipscope.pipelines.worlds.shapes import world as sw
from clipscope.pipelines.data.webdataset_input import decode_image, iter_shard_samples


@pytest.fixture(scope="module")
def scenes():
    return list(sw.generate_scenes(300, 11))


def _naive_inside(shape: str, u: float, v: float) -> bool:
    """One point at a time, independent of the generator's vectorised tests."""
    if shape == "circle":
        return u * u + v * v <= 0.81
    if shape == "square":
        return abs(u) <= 0.8 and abs(v) <= 0.8
    if shape == "cross":
        return (abs(u) <= 0.32 and abs(v) <= 0.95) or (abs(v) <= 0.32 and abs(u) <= 0.95)
    if shape == "heart":
        x, y = u * 1.2, -v * 1.2 + 0.15
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    return MplPath(sw.POLYGON_VERTICES[shape]).contains_point((u, v))


def _naive_mask(scene: sw.Scene, size: int) -> np.ndarray:
    """Per pixel, per 2×2 subsample: the topmost object covering ≥ half the pixel."""
    mask = np.zeros((size, size), np.uint8)
    for k in range(len(scene.objects) - 1, -1, -1):  # back to front
        obj = scene.objects[k]
        for y in range(size):
            for x in range(size):
                if abs(x + 0.5 - obj.center[0]) > obj.radius * 1.2 or abs(y + 0.5 - obj.center[1]) > obj.radius * 1.2:
                    continue
                hits = sum(
                    _naive_inside(obj.shape, (x + dx - obj.center[0]) / obj.radius, (y + dy - obj.center[1]) / obj.radius)
                    for dx in (0.25, 0.75) for dy in (0.25, 0.75)
                )
                if hits >= 2:
                    mask[y, x] = k + 1
    return mask


def test_masks_match_a_naive_rasteriser(scenes):
    for scene in scenes[:4]:
        ref = _naive_mask(scene, scene.mask.shape[0])
        # Centres and radii are rounded to 4 decimals in the attributes; a boundary subsample may
        # flip, so allow a handful of pixels.
        assert (ref != scene.mask).sum() <= 3, scene.key
        assert set(np.unique(scene.mask)) <= set(range(len(scene.objects) + 1))


def test_render_is_a_pure_function_of_seed_and_index():
    first = list(sw.generate_scenes(12, 5))
    again = list(sw.generate_scenes(4, 5, start=8))
    for a, b in zip(first[8:], again):
        assert a.key == b.key and a.caption == b.caption and a.objects == b.objects
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)
    other = list(sw.generate_scenes(12, 6))
    assert sum(np.array_equal(a.image, b.image) for a, b in zip(first, other)) == 0
    assert [s["png"] for s in sw.generate(5, 5)] == [s["png"] for s in sw.generate(5, 5)]


def test_planted_attributes_are_consistent(scenes):
    colours, shapes = list(sw.COLOURS), sw.SHAPES
    for scene in scenes:
        objs = scene.objects
        assert 1 <= len(objs) <= 3
        assert scene.label == colours.index(objs[0].colour) * len(shapes) + shapes.index(objs[0].shape)
        assert sw.LABELS[scene.label] == objs[0].name
        assert len({o.cell for o in objs}) == len(objs) and len({o.name for o in objs}) == len(objs)
        order = list(sw.SIZES)
        assert all(order.index(objs[0].size) >= order.index(o.size) for o in objs)
        assert all(sw.POSITIONS[o.cell[0] * 3 + o.cell[1]] == o.position for o in objs)
        # The main object is drawn on top: its mask is exactly where it covers half a pixel.
        assert scene.object_mask(0).sum() == objs[0].area > 0
        for o in objs:
            assert o.area == (scene.mask == o.mask_value).sum()
            assert np.abs(np.array(o.rgb) - np.array(sw.COLOURS[o.colour])).max() <= 12


def test_pixels_carry_the_planted_colours_and_positions(scenes):
    for scene in scenes[:100]:
        image = scene.image.astype(float)
        for o in scene.objects:
            inside = scene.mask == o.mask_value
            # Interior pixels (all 4-neighbours inside) are the object's colour plus σ=3 noise
            # (clipped to 0..255, so compare medians).
            core = inside.copy()
            core[1:] &= inside[:-1]
            core[:-1] &= inside[1:]
            core[:, 1:] &= inside[:, :-1]
            core[:, :-1] &= inside[:, 1:]
            if core.sum() >= 10:
                assert np.abs(np.median(image[core], 0) - np.array(o.rgb)).max() <= 2.5, (scene.key, o)
            ys, xs = np.nonzero(inside)
            if len(ys) > 0.8 * np.pi * (0.8 * o.radius) ** 2:  # barely occluded: centroid in its cell
                cell = scene.mask.shape[0] / 3
                assert (int(ys.mean() // cell), int(xs.mean() // cell)) == o.cell
        background = image[scene.mask == 0]
        spread = background.max(1) - background.min(1)
        assert np.median(spread) < 40  # grey-ish: objects are saturated (spread ≥ 120)
    assert min(max(c) - min(c) for c in sw.COLOURS.values()) >= 120


def test_captions_name_the_main_object(scenes):
    templates = Counter()
    for scene in scenes:
        main, text = scene.main, scene.caption
        templates[scene.template] += 1
        assert scene.template in (sw.SINGLE_TEMPLATES if len(scene.objects) == 1 else sw.MULTI_TEMPLATES)
        if scene.template in ("colour_shape", "size_colour_shape", "colour_shape_position", "full", "list",
                              "count_list", "main_and_others", "list_positions"):
            assert f"{main.colour} {main.shape}" in text
        if scene.template in ("colour_only",):
            assert text.endswith(f"{main.colour} shape")
        if scene.template in ("full", "colour_shape_position", "shape_position", "list_positions"):
            assert sw.POSITION_PHRASES[main.position] in text
        if scene.template in ("count_list", "count_only"):
            assert text.split(" shapes")[0].split(" ")[-1] == sw.COUNT_WORDS[len(scene.objects)]
        assert " a orange" not in text and " a " + "orange" not in text and not text.startswith("a orange")
    assert len(templates) == len(sw.CAPTION_TEMPLATES)


def test_attributes_are_balanced():
    scenes = list(sw.generate_scenes(700, 3))
    for values, names in ((Counter(s.main.colour for s in scenes), sw.COLOURS),
                          (Counter(s.main.shape for s in scenes), sw.SHAPES),
                          (Counter(len(s.objects) for s in scenes), (1, 2, 3)),
                          (Counter(s.background["kind"] for s in scenes), sw.BACKGROUNDS)):
        expected = len(scenes) / len(names)
        assert set(values) == set(names)
        assert all(0.6 * expected < values[n] < 1.4 * expected for n in names), values


def test_counts_option_and_image_size():
    singles = list(sw.generate_scenes(30, 1, config=sw.WorldConfig(image_size=96, counts=(1,))))
    assert all(len(s.objects) == 1 and s.image.shape == (96, 96, 3) and s.mask.shape == (96, 96) for s in singles)
    for bad in (dict(image_size=16), dict(counts=(4,)), dict(counts=()), dict(noise=-1.0)):
        with pytest.raises(ConfigError):
            sw.WorldConfig(**bad).validated()
    with pytest.raises(ConfigError, match="n must be"):
        list(sw.generate(-1, 0))
    with pytest.raises(ConfigError, match="unknown world option"):
        list(sw.generate(1, 0, colour="red"))
    jittered = sw.world_config(64, position_jitter=0.1, radius_jitter=0.1, counts=[2])
    centres = {o.center for s in sw.generate_scenes(20, 0, config=jittered) for o in s.objects}
    assert len(centres) == 40 and all(len(s.objects) == 2 for s in sw.generate_scenes(5, 0, config=jittered))


def test_encode_png_round_trips_through_pil(scenes):
    for array in (scenes[0].image, scenes[0].mask, np.zeros((3, 5, 3), np.uint8)):
        decoded = np.asarray(Image.open(io.BytesIO(sw.encode_png(array))))
        np.testing.assert_array_equal(decoded, array)
    with pytest.raises(ConfigError):
        sw.encode_png(np.zeros((4, 4, 4), np.uint8))


def test_write_world_shards_read_back(tmp_path):
    paths = sw.write_world(tmp_path / "w", 2, 7, seed=4)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["shapes-00000.tar", "shapes-00001.tar"]
    scenes = list(sw.generate_scenes(14, 4))
    got = [raw for path in paths for raw in iter_shard_samples(path)]
    assert len(got) == 14
    for raw, scene in zip(got, scenes):
        assert raw.error is None and raw.key == scene.key
        assert raw.label == scene.label and raw.caption == scene.caption
        np.testing.assert_array_equal(np.asarray(decode_image(raw.image_bytes)), scene.image)
        assert raw.meta["objects"][0]["shape"] == scene.main.shape and raw.meta["count"] == len(scene.objects)
        assert raw.meta["label_name"] == sw.LABELS[scene.label]
    with tarfile.open(paths[0]) as tf:
        names = tf.getnames()
        assert names[:5] == [f"{scenes[0].key}.{ext}" for ext in ("png", "mask.png", "txt", "cls", "json")]
        mask = np.asarray(Image.open(tf.extractfile(names[1])))
        np.testing.assert_array_equal(mask, scenes[0].mask)
        meta = json.load(tf.extractfile(names[4]))
        assert meta["objects"][0]["bbox"] == list(scenes[0].main.bbox)
    world = json.loads((tmp_path / "w" / "world.json").read_text())
    assert world["labels"] == list(sw.LABELS) and world["shards"] == ["shapes-00000.tar", "shapes-00001.tar"]
    again = sw.write_world(tmp_path / "v", 2, 7, seed=4)
    assert [open(p, "rb").read() for p in again] == [open(p, "rb").read() for p in paths]


def test_cli(tmp_path, capsys):
    assert sw.main([str(tmp_path / "c"), "--shards", "1", "--per-shard", "3", "--seed", "2", "--counts", "1"]) == 0
    assert "wrote 3 samples" in capsys.readouterr().out
    assert len(list(iter_shard_samples(str(tmp_path / "c" / "shapes-00000.tar")))) == 3
    assert sw.main([str(tmp_path / "d"), "--per-shard", "0"]) == 2
    assert "per_shard must be an integer ≥ 1, got 0" in capsys.readouterr().err
