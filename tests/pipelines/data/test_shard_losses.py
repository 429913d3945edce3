"""Shards that cannot be read whole: how many samples are lost and why, files
that are not tar archives at all, zstd-compressed shards, and shard files' permissions."""

from __future__ import annotations

import io
import json
import os
import stat

import numpy as np
import pytest
import zstandard
from PIL import Image

from clipscope.pipelines.data.shard_counts import shard_sample_count
from clipscope.pipelines.data.webdataset_input import iter_shard_samples, write_shard


def shard(path, n: int) -> str:
    rows = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(buffer, format="PNG")
        rows.append({"__key__": f"k{i:03d}", "png": buffer.getvalue(), "cls": i})
    write_shard(str(path), rows)
    return str(path)


def read(url: str, expected: int | None):
    samples = iter_shard_samples(url, expected_count=expected)
    keys = [s.key for s in samples]
    return keys, samples


def test_a_stale_stats_sidecar_says_how_many_samples_were_skipped(tmp_path):
    url = shard(tmp_path / "000.tar", 64)
    (tmp_path / "000_stats.json").write_text(json.dumps({"successes": 10}))
    count = shard_sample_count(url)
    assert (count.count, count.source) == (10, "stats")
    keys, samples = read(url, count.count)
    assert len(keys) == 10
    assert samples.lost == 54 and not samples.unreadable
    assert "holds 64 samples but 10 were counted" in samples.error


def test_a_shard_shorter_than_its_count_loses_the_difference(tmp_path):
    url = shard(tmp_path / "000.tar", 6)
    keys, samples = read(url, 10)
    assert len(keys) == 6 and samples.lost == 4 and "6 of the 10" in samples.error


def test_a_complete_shard_loses_nothing(tmp_path):
    url = shard(tmp_path / "000.tar", 5)
    keys, samples = read(url, 5)
    assert len(keys) == 5 and samples.lost == 0 and samples.error is None and not samples.unreadable


@pytest.mark.parametrize("content", [b"", os.urandom(5000), b"\x07" * 3000], ids=["zero-bytes", "random", "garbage"])
def test_bytes_that_are_not_a_tar_are_unreadable_not_truncated(tmp_path, content):
    path = tmp_path / "bad.tar"
    path.write_bytes(content)
    count = shard_sample_count(str(path))
    assert count.count == 0 and count.error.startswith("not a readable tar archive")
    keys, samples = read(str(path), 0)
    assert keys == [] and samples.unreadable and samples.error.startswith("not a readable tar archive")


def test_a_truncated_tar_is_not_unreadable(tmp_path):
    url = shard(tmp_path / "000.tar", 10)
    size = os.path.getsize(url)
    with open(url, "r+b") as f:
        f.truncate(size // 2 + 100)
    count = shard_sample_count(url)
    keys, samples = read(url, count.count)
    assert 0 < len(keys) < 10 and not samples.unreadable and samples.error.startswith("truncated after")


def test_a_tar_zst_shard_reads_like_its_tar(tmp_path):
    url = shard(tmp_path / "000.tar", 7)
    zst = tmp_path / "000.tar.zst"
    with open(url, "rb") as f:
        zst.write_bytes(zstandard.ZstdCompressor().compress(f.read()))
    count = shard_sample_count(str(zst))
    assert (count.count, count.error) == (7, None)
    keys, samples = read(str(zst), 7)
    assert keys == read(url, 7)[0] and samples.error is None


def test_write_shard_gives_a_normal_file_mode(tmp_path):
    old = os.umask(0o022)
    try:
        url = shard(tmp_path / "000.tar", 1)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(url).st_mode) == 0o644
