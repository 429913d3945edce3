"""The ImageNet-segmentation converter on a synthetic HDF5 file with the gtsegs_ijcv.mat layout (object
references under /value/img and /value/gt, MATLAB's column-major [3, W, H] images and a 1×1 cell per mask):
images and masks round-trip into shards that extraction reads with --masks."""

from __future__ import annotations

import io
import tarfile

import h5py  # the converter's optional dependency; installed with the test extras
import numpy as np
from PIL import Image


def write_gtsegs(path, images, masks) -> None:
    """MATLAB v7.3 as h5py sees it: datasets stored transposed, cells as arrays of references."""
    ref = h5py.special_dtype(ref=h5py.Reference)
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        img = f.create_dataset("value/img", (len(images), 1), dtype=ref)
        gt = f.create_dataset("value/gt", (len(images), 1), dtype=ref)
        for i, (image, mask) in enumerate(zip(images, masks)):
            data = refs.create_dataset(f"img{i}", data=image.transpose(2, 1, 0))
            img[i, 0] = data.ref
            m = refs.create_dataset(f"gt{i}", data=mask.transpose(1, 0))
            cell = refs.create_dataset(f"cell{i}", (1, 1), dtype=ref)
            cell[0, 0] = m.ref
            gt[i, 0] = cell.ref


def members(path):
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def test_images_and_masks_round_trip_into_shards(tmp_path, capsys):
    from extract_helpers import run_cli

    rng = np.random.default_rng(0)
    shapes = [(20, 31), (33, 17), (24, 24)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    masks = [(rng.random((h, w)) < 0.4).astype(np.uint8) for h, w in shapes]
    source = tmp_path / "gtsegs_ijcv.mat"
    write_gtsegs(source, images, masks)
    assert run_cli("convert", "imagenet-seg", source, "--out", tmp_path / "shards", "--per-shard", "2",
                   "--image-format", "png") == 0
    assert "wrote 2 shard(s)" in capsys.readouterr().out
    found = {**members(tmp_path / "shards" / "imagenet-seg-00000.tar"),
             **members(tmp_path / "shards" / "imagenet-seg-00001.tar")}
    for i, (image, mask) in enumerate(zip(images, masks)):
        key = f"imagenet-seg-{i:05d}"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(found[f"{key}.png"]))), image)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(found[f"{key}.mask.png"]))), mask)


def test_a_file_of_another_layout_is_refused_in_one_line(tmp_path, capsys):
    from extract_helpers import run_cli

    with h5py.File(tmp_path / "other.mat", "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    assert run_cli("convert", "imagenet-seg", tmp_path / "other.mat", "--out", tmp_path / "s") == 2
    assert "not the gtsegs_ijcv.mat layout" in capsys.readouterr().err
    (tmp_path / "text.mat").write_text("not hdf5")
    assert run_cli("convert", "imagenet-seg", tmp_path / "text.mat", "--out", tmp_path / "s") == 2
    assert "is not an HDF5 (MATLAB v7.3) file" in capsys.readouterr().err
