"""The per-shard member offset index: one header scan finds every member's bytes (checked against tarfile's
own extraction), the index is stored beside the manifest and read back, a compressed or changed shard is
refused with one line, and `clipscope view --build-index` writes it (the viewer then never scans a shard)."""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from clipscope.errors import DataError
from clipscope.pipelines.data import member_index
from clipscope.pipelines.data.webdataset_input import split_member_name, write_shard
from clipscope.storage.layout import MEMBERS_DIR, RESERVED_NAMES
from clipscope.storage.store import RunStore

from extract_helpers import run_cli


def _samples(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 255, (8 + i, 10, 3), dtype=np.uint8))
        sample = {"__key__": f"dir/sub/{i:04d}", "png": image, "cls": i, "txt": f"caption {i}"}
        if i % 3 == 0:
            sample["0.jpg"] = image  # a compound suffix too
        yield sample


@pytest.fixture
def shard(tmp_path):
    path = str(tmp_path / "shard-0000.tar")
    write_shard(path, _samples(9))
    return path


def members_by_tarfile(path: str) -> dict[tuple[str, str], bytes]:
    out = {}
    with tarfile.open(path) as tf:
        for info in tf.getmembers():
            split = split_member_name(info.name)
            if info.isreg() and split is not None:
                out[split] = tf.extractfile(info).read()
    return out


def test_scan_finds_every_member(shard):
    index = member_index.scan_shard(shard)
    expected = members_by_tarfile(shard)
    found = {(key, suffix) for key, members in index.members.items() for suffix in members}
    assert found == set(expected)
    for (key, suffix), data in expected.items():
        assert member_index.read_member(index, key, suffix) == data
    assert index.shard_size == os.path.getsize(shard)
    assert index.image_member("dir/sub/0000") == "png" and index.image_member("dir/sub/0001") == "png"
    assert index.image_member("missing") is None


def test_table_round_trip(shard):
    index = member_index.scan_shard(shard)
    assert member_index.MemberIndex.from_table(index.table()) == index


def test_compressed_shard_is_refused(shard, tmp_path):
    packed = str(tmp_path / "shard.tar.gz")
    with open(shard, "rb") as src, gzip.open(packed, "wb") as dst:
        shutil.copyfileobj(src, dst)
    with pytest.raises(DataError, match="compressed"):
        member_index.scan_shard(packed)


def test_changed_shard_is_refused(shard):
    index = member_index.scan_shard(shard)
    with open(shard, "ab") as fh:
        fh.write(b"\0" * 1024)
    with pytest.raises(DataError, match="changed since its member index was built"):
        member_index.check_current(index)


def test_missing_shard_and_member(shard, tmp_path):
    with pytest.raises(DataError, match="shard not found"):
        member_index.scan_shard(str(tmp_path / "nope.tar"))
    index = member_index.scan_shard(shard)
    with pytest.raises(Exception, match="no member dir/sub/0000.webp"):
        member_index.read_member(index, "dir/sub/0000", "webp")


def test_members_dir_is_reserved():
    assert MEMBERS_DIR in RESERVED_NAMES


def test_build_index_through_the_cli_and_the_viewer_uses_it(shapes_store_copy):
    from clipscope.pipelines.view import StoreView
    from clipscope.pipelines.view.images import ImageSource

    url = shapes_store_copy
    assert run_cli("view", url, "--build-index") == 0
    store = RunStore.open(url, "r")
    stored = member_index.read_stored_index(store, 0)
    assert stored == member_index.scan_shard(store.info.shards[0])
    written = os.path.getmtime(os.path.join(url, MEMBERS_DIR, member_index.part_name(0)))
    assert run_cli("view", url, "--build-index") == 0  # already there: not rewritten
    assert os.path.getmtime(os.path.join(url, MEMBERS_DIR, member_index.part_name(0))) == written
    view = StoreView(url)
    images = ImageSource(view)
    key = view.samples()["key"][0].as_py()
    assert images.thumbnail(key, 64)[:4] == b"\x89PNG"
    assert images.scans == 0 and images.reads == 1
    images.thumbnail(key, 64)
    assert images.reads == 1  # cached


@pytest.fixture
def shapes_store_copy(tmp_path):
    """A small store of one shapes-world shard, extracted with a random-init tiny model (no reductions)."""
    from clipscope.pipelines.worlds.shapes.world import write_world

    write_world(tmp_path / "data", 1, 6, 0)
    out = str(tmp_path / "store")
    code = run_cli("extract", str(tmp_path / "data"), "--out", out, "--model", "clipscope-tiny", "--pretrained", "none",
                   "--rows-per-chunk", "4")
    assert code == 0
    return out


@pytest.mark.parametrize("argv, flag", [(["--port", "70000"], "port"), (["--host", "example.org"], "host"),
                                        (["--threads", "0"], "threads")])
def test_view_bad_flags_exit_2(shapes_store_copy, argv, flag, capsys):
    assert run_cli("view", shapes_store_copy, *argv) == 2
    assert f"--{flag}" in capsys.readouterr().err


def test_view_missing_store_exits_2(tmp_path, capsys):
    assert run_cli("view", str(tmp_path / "nothing")) == 2
    assert "no run store" in capsys.readouterr().err
