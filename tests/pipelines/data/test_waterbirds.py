"""The Waterbirds converter on a generated folder in the Waterbirds layout: only the split's rows, the image
bytes unchanged, cls = y, group = place; then (from the CLI) convert, extract (groups stored) and `worst-group --task waterbirds`."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from clipscope.errors import DataError
from clipscope.pipelines.data.waterbirds import convert_waterbirds
from clipscope.storage.store import RunStore

from extract_helpers import extract_args, run_cli


@pytest.fixture
def folder(tmp_path):
    """A Waterbirds-like folder: 12 images in class subfolders, metadata.csv with an extra column."""
    rng = np.random.default_rng(3)
    lines = ["img_id,img_filename,y,split,place,place_filename"]
    images = {}
    for i in range(12):
        name = f"{i % 3:03d}.Bird_{i % 3}/Bird_{i}_{i:04d}.jpg"
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buffer, "JPEG")
        (tmp_path / name).write_bytes(buffer.getvalue())
        images[name] = buffer.getvalue()
        lines.append(f"{i + 1},{name},{i % 2},{2 if i < 8 else 0},{(i // 2) % 2},/x/{i}.jpg")
    (tmp_path / "metadata.csv").write_text("\n".join(lines) + "\n")
    return tmp_path, images


def members(path):
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def test_convert_keeps_the_split_bytes_classes_and_groups(folder, tmp_path):
    root, images = folder
    paths = convert_waterbirds(str(root), str(tmp_path / "out"), split="test", per_shard=5)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["waterbirds-test-00000.tar", "waterbirds-test-00001.tar"]
    got = {}
    for path in paths:
        got.update(members(path))
    for i in range(8):
        name = f"{i % 3:03d}.Bird_{i % 3}/Bird_{i}_{i:04d}.jpg"
        key = name[:-4].replace("/", "_").replace(".", "_")
        assert got[f"{key}.jpg"] == images[name]
        assert got[f"{key}.cls"] == str(i % 2).encode()
        meta = json.loads(got[f"{key}.json"])
        assert meta == {"group": (i // 2) % 2, "place": (i // 2) % 2, "y": i % 2, "img_filename": name}
    assert len(got) == 8 * 3  # the train rows (i ≥ 8) are left out


def test_bad_folders(folder, tmp_path):
    root, _ = folder
    with pytest.raises(DataError, match="no metadata.csv in"):
        convert_waterbirds(str(tmp_path / "nowhere"), str(tmp_path / "o"))
    (root / "metadata.csv").write_text("img_filename,y,split\nx.jpg,0,2\n")
    with pytest.raises(DataError, match="lacks the column\\(s\\) place"):
        convert_waterbirds(str(root), str(tmp_path / "o"))


def test_convert_extract_worst_group(folder, tmp_path, capsys, fast_models):
    root, _ = folder
    assert run_cli("convert", "waterbirds", root, "--out", tmp_path / "shards", "--per-shard", "4") == 0
    assert "wrote 2 shard(s)" in capsys.readouterr().out
    out = tmp_path / "store.zarr"
    assert run_cli(*extract_args(str(tmp_path / "shards"), out)) == 0
    samples = RunStore.open(str(out)).read_samples()
    assert sorted(zip(samples.column("label").to_pylist(), samples.column("group").to_pylist())) == sorted(
        (i % 2, (i // 2) % 2) for i in range(8))
    capsys.readouterr()
    assert run_cli("worst-group", out, "--task", "waterbirds", "--heads", "L3H0,L3H1") == 0
    table = capsys.readouterr().out
    assert "landbird/g0 (n=2)" in table and "waterbird/g1 (n=2)" in table and "heads:L3H0,L3H1" in table
