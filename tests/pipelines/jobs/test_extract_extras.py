"""Store prerequisites of the segmentation and CLIP-InterpreT analyses (spec S13): masks after
the image's own geometry, the `group` column, `direct/token_sum` (its identity from the store alone),
class-token attention rows, `.npy` members; a killed shard resumes to the same bytes with them."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from extract_helpers import extract_args, run_cli
from masked_helpers import write_masked_shards

EXTRAS = ("--masks", "--token-sum", "--attention-layers", "1", "3")


def _torchvision():
    from clipscope._torchvision_compat import import_open_clip

    import_open_clip()  # torchvision importable next to a CPU torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional

    return functional, InterpolationMode.NEAREST


def nearest_resize(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torchvision's Resize((h, w), NEAREST) of a mask: the reference code's squash."""
    tf, nearest = _torchvision()
    return np.asarray(tf.resize(Image.fromarray(mask), list(size), interpolation=nearest))


def shortest_side_then_crop(mask: np.ndarray, side: int) -> np.ndarray:
    """open_clip's default geometry through torchvision itself: Resize(side) (the shorter side), CenterCrop."""
    tf, nearest = _torchvision()
    return np.asarray(tf.center_crop(tf.resize(Image.fromarray(mask), side, interpolation=nearest), [side, side]))


@pytest.fixture(scope="module")
def masked(tmp_path_factory, fast_models):
    folder, masks, groups = write_masked_shards(tmp_path_factory.mktemp("masked") / "shards")
    store = str(tmp_path_factory.mktemp("masked-store") / "store.zarr")
    assert run_cli(*extract_args(folder, store, *EXTRAS)) == 0
    return folder, store, masks, groups


def test_masks_follow_the_image_geometry_and_groups_land_in_the_index(masked):
    from clipscope.pipelines.data.masks import MASK_MISSING
    from clipscope.storage.store import RunStore

    _, url, masks, groups = masked
    store = RunStore.open(url)
    samples = store.read_samples().to_pydict()
    stored = store.read("masks")
    assert store.dims("masks") == ("sample", "mask_y", "mask_x") and stored.dtype == np.uint8
    for row, key in zip(samples["row"], samples["key"]):
        if key in masks:
            assert np.array_equal(stored[row], shortest_side_then_crop(masks[key], 64)), key
        else:
            assert (stored[row] == MASK_MISSING).all(), key
    assert dict(zip(samples["key"], samples["group"])) == groups


def test_token_sum_identity_and_attention_rows_from_the_store_alone(masked):
    from clipscope.storage.store import RunStore

    store = RunStore.open(masked[1])
    valid = store.read_valid()
    token_sum = store.read("direct/token_sum").astype(np.float64)[valid]
    assert store.dims("direct/token_sum") == ("sample", "token", "embed")
    total = (token_sum.sum(1) + store.read("direct/mlps").astype(np.float64).sum(1)[valid]
             + store.read("direct/embedding")[valid] + store.read("direct/bias")[valid])
    embedding = store.read("image_embedding")[valid]
    assert np.abs(total - embedding).max() <= 1e-5 * np.abs(embedding).max()
    # Σ_t token_sum = Σ_{l,h} direct/heads
    heads = store.read("direct/heads").astype(np.float64)[valid].sum((1, 2))
    assert np.allclose(token_sum.sum(1), heads, atol=1e-5 * np.abs(heads).max())
    for layer in (1, 3):
        rows = store.read(f"attention/layer_{layer}")[valid]
        assert store.dims(f"attention/layer_{layer}") == ("sample", "head", "token")
        assert np.allclose(rows.sum(-1), 1, atol=1e-5) and (rows >= 0).all()
    assert store.info.attention_layers == (1, 3)


def test_a_killed_shard_resumes_to_the_same_bytes_with_the_new_arrays(masked, tmp_path, capsys):
    from clipscope.storage.store import RunStore

    folder, base, _, _ = masked
    url = str(tmp_path / "copy.zarr")
    shutil.copytree(base, url)
    os.remove(os.path.join(url, "manifest", "extract", "done-000001.json"))
    os.remove(os.path.join(url, "samples", "part-000001.parquet"))
    os.remove(os.path.join(url, "samples.parquet"))
    writer = RunStore.open(url, "r+")
    rng = np.random.default_rng(1)
    garbage = {name: rng.integers(0, 200, (8, *writer.array(name).shape[1:])).astype(writer.array(name).dtype)
               for name in writer.array_names(per_sample=True) if name != "valid"}
    writer.write_rows(8, garbage, np.ones(8, bool))
    assert run_cli(*extract_args(folder, url, *EXTRAS)) == 0
    assert "1 shards extracted, 1 already done" in capsys.readouterr().out
    got, want = RunStore.open(url), RunStore.open(base)
    assert sorted(got.array_names()) == sorted(want.array_names())
    for name in want.array_names(per_sample=True):
        assert got.read(name).tobytes() == want.read(name).tobytes(), name
    assert pq.read_table(os.path.join(url, "samples.parquet")).equals(pq.read_table(os.path.join(base, "samples.parquet")))


def test_npy_masks_and_the_reference_geometry(tmp_path, fast_models):
    from clipscope.storage.store import RunStore

    folder, masks, _ = write_masked_shards(tmp_path / "shards", counts=(4,), seed=2, member="mask.npy")
    url = str(tmp_path / "npy.zarr")
    assert run_cli(*extract_args(folder, url, "--masks", "mask.npy", "--mask-geometry", "reference")) == 0
    store = RunStore.open(url)
    samples = store.read_samples().to_pydict()
    for row, key in zip(samples["row"], samples["key"]):
        if key in masks:
            assert np.array_equal(store.read("masks", [row])[0], nearest_resize(masks[key], (64, 64))), key


def test_shapes_world_masks_equal_the_scene_masks_after_the_transform(tmp_path, fast_models):
    from clipscope.pipelines.worlds.shapes import world
    from clipscope.storage.store import RunStore

    world.write_world(tmp_path / "world", 1, 6, seed=4)
    url = str(tmp_path / "shapes.zarr")
    assert run_cli(*extract_args(str(tmp_path / "world"), url, "--masks")) == 0  # the tiny model: 48 → 64 px
    store = RunStore.open(url)
    stored = store.read("masks")
    for index, scene in enumerate(world.generate_scenes(6, 4)):
        assert np.array_equal(stored[index], shortest_side_then_crop(scene.mask, 64))


def test_sample_index_parts_without_a_group_column_read_as_minus_one(masked, tmp_path):
    from clipscope.storage.store import RunStore

    url = str(tmp_path / "old.zarr")
    shutil.copytree(masked[1], url)
    path = os.path.join(url, "samples.parquet")
    table = pq.read_table(path)
    pq.write_table(table.drop(["group"]), path)
    groups = RunStore.open(url).read_samples()["group"]
    assert groups.type == pa.int64() and set(groups.to_pylist()) == {-1}


def test_bad_mask_options_fail_in_one_line(masked, tmp_path, capsys):
    assert run_cli(*extract_args(masked[0], tmp_path / "x.zarr", "--masks", "mask.txt")) == 2
    assert "--masks must name a .png or .npy member" in capsys.readouterr().err
    assert run_cli(*extract_args(masked[0], tmp_path / "y.zarr", "--masks", "--mask-geometry", "squash")) == 2
    assert "--mask-geometry must be preprocess or reference, got 'squash'" in capsys.readouterr().err
