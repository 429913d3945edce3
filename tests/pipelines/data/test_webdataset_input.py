"""Webdataset input layer: URL expansion, counts, streaming samples, decoding, writing, prefetch."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import uuid

import fsspec
import numpy as np
import pytest
import webdataset
from PIL import Image

from clipscope.errors import ConfigError, DataError
from clipscope.pipelines.data.shard_counts import (
    ShardCount,
    count_all,
    scan_sample_count,
    shard_sample_count,
)
from clipscope.pipelines.data.webdataset_input import (
    RawSample,
    decode_image,
    decode_or_error,
    expand_urls,
    iter_shard_samples,
    walk_tar_groups,
    write_shard,
)

# ----------------------------------------------------------------------------------------------
# Fixture makers


def image_bytes(seed: int, fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def samples(n: int, *, start: int = 0, prefix: str = "s") -> list[dict]:
    """n samples alternating PNG/JPEG images with cls, txt and json members."""
    out = []
    for i in range(start, start + n):
        ext, fmt = ("png", "PNG") if i % 2 == 0 else ("jpg", "JPEG")
        out.append(
            {
                "__key__": f"{prefix}{i:05d}",
                ext: image_bytes(i, fmt),
                "cls": i % 3,
                "txt": f"caption {i}",
                "json": {"index": i},
            }
        )
    return out


def raw_tar(members: list[tuple[str, bytes]]) -> bytes:
    """A tar with exactly these members in this order (for layouts write_shard refuses)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def keys_by_webdataset(path: str) -> list[str]:
    """Reference grouping: webdataset's own tar iterator and group_by_keys."""
    with open(path, "rb") as stream:
        files = webdataset.tariterators.tar_file_expander([{"url": path, "stream": stream}])
        return [s["__key__"] for s in webdataset.tariterators.group_by_keys(files)]


def read_all(url: str, **kwargs) -> tuple[list[RawSample], str | None]:
    it = iter_shard_samples(url, **kwargs)
    got = list(it)
    assert it.finished
    return got, it.error


@pytest.fixture()
def shard_dir(tmp_path):
    directory = tmp_path / "shards"
    for s in range(3):
        write_shard(str(directory / f"{s:03d}.tar"), samples(4, start=4 * s))
    (directory / "notes.txt").write_text("not a shard")
    return directory


@pytest.fixture()
def memory_root():
    root = f"memory://clipscope-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root.replace("memory://", "/")):
        fs.rm(root.replace("memory://", "/"), recursive=True)


# ----------------------------------------------------------------------------------------------
# expand_urls


def test_expand_brace_glob_and_directory_agree(shard_dir):
    expected = [str(shard_dir / f"{s:03d}.tar") for s in range(3)]
    assert expand_urls([str(shard_dir / "{000..002}.tar")]) == expected
    assert expand_urls([str(shard_dir / "*.tar")]) == expected
    assert expand_urls([str(shard_dir)]) == expected
    assert expand_urls(str(shard_dir / "00{0,1}.tar") + "::" + str(shard_dir / "002.tar")) == expected


def test_expand_dedupes_keeping_first_and_is_absolute(shard_dir, monkeypatch):
    monkeypatch.chdir(shard_dir)
    got = expand_urls(["002.tar", str(shard_dir / "*.tar"), "./000.tar"])
    assert got == [str(shard_dir / "002.tar"), str(shard_dir / "000.tar"), str(shard_dir / "001.tar")]
    assert expand_urls(shard_dir / "001.tar") == [str(shard_dir / "001.tar")]


def test_expand_missing_and_empty_errors_name_the_path(shard_dir, tmp_path):
    missing = str(shard_dir / "{002..003}.tar")
    with pytest.raises(DataError, match="003.tar"):
        expand_urls([missing])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty"):
        expand_urls([str(empty)])
    with pytest.raises(DataError, match=r"nomatch-\*\.tar"):
        expand_urls([str(shard_dir / "nomatch-*.tar")])
    with pytest.raises(DataError, match="no shards found"):
        expand_urls([])
    with pytest.raises(DataError, match="shard file not found: file://"):
        expand_urls([f"file://{shard_dir}/099.tar"])


def test_expand_fsspec_urls(shard_dir, memory_root):
    file_url = f"file://{shard_dir}/001.tar"
    assert expand_urls([file_url]) == [file_url]
    for i in range(2):
        write_shard(f"{memory_root}/m/{i}.tar", samples(2))
    listed = expand_urls([f"{memory_root}/m/*.tar"])
    assert len(listed) == 2 and all(u.startswith("memory://") for u in listed)
    assert expand_urls([f"{memory_root}/m"]) == listed
    assert expand_urls([f"{memory_root}/m/{{0..1}}.tar"]) == [f"{memory_root}/m/0.tar", f"{memory_root}/m/1.tar"]
    with pytest.raises(DataError, match="7.tar"):
        expand_urls([f"{memory_root}/m/7.tar"])
    # Remote and pipe URLs are kept as given (no network here).
    remote = ["s3://bucket/a.tar", "gs://bucket/b.tar", "pipe:cat /x/{0..1}.tar"]
    assert expand_urls(remote) == ["s3://bucket/a.tar", "gs://bucket/b.tar", "pipe:cat /x/0.tar", "pipe:cat /x/1.tar"]


# ----------------------------------------------------------------------------------------------
# Counting


def test_scan_counts_match_iteration_and_webdataset(shard_dir):
    for url in expand_urls([str(shard_dir)]):
        count = shard_sample_count(url)
        got, error = read_all(url)
        assert count == ShardCount(4, "scan") and error is None
        assert [s.key for s in got] == keys_by_webdataset(url)
        assert [s.index_in_shard for s in got] == [0, 1, 2, 3]


def test_index_json_is_preferred_and_resolved_relative_to_itself(shard_dir, tmp_path):
    # Deliberately wrong counts prove the index was used and not a scan.
    index = {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "shardlist": [{"url": "000.tar", "nsamples": 40}, {"url": "./001.tar", "nsamples": 41}],
    }
    (shard_dir / "shardindex.json").write_text(json.dumps(index))
    urls = expand_urls([str(shard_dir / "*.tar")])
    assert count_all(urls, max_workers=2) == [ShardCount(40, "index"), ShardCount(41, "index"), ShardCount(4, "scan")]
    # An index stored elsewhere, with a base and absolute entries found by basename.
    elsewhere = tmp_path / "meta" / "idx.json"
    elsewhere.parent.mkdir()
    elsewhere.write_text(
        json.dumps({"wids_version": 1, "base": str(shard_dir), "shardlist": [{"url": "002.tar", "nsamples": 7}]})
    )
    assert shard_sample_count(urls[2], index_url=str(elsewhere)) == ShardCount(7, "index")
    elsewhere.write_text(json.dumps({"shardlist": [{"url": "s3://bucket/x/002.tar", "nsamples": 9}]}))
    assert shard_sample_count(urls[2], index_url=str(elsewhere)) == ShardCount(9, "index")
    (shard_dir / "shardindex.json").write_text(json.dumps({"shardlist": [{"url": "000.tar", "nsamples": -1}]}))
    with pytest.raises(DataError, match="shardindex.json: entry 0"):
        shard_sample_count(urls[0])


def test_img2dataset_stats_sidecar(shard_dir):
    (shard_dir / "001_stats.json").write_text(json.dumps({"count": 10, "successes": 3, "failed_to_download": 7}))
    assert shard_sample_count(str(shard_dir / "001.tar")) == ShardCount(3, "stats")
    (shard_dir / "001_stats.json").write_text("{not json")
    with pytest.raises(DataError, match="001_stats.json"):
        shard_sample_count(str(shard_dir / "001.tar"))


def test_memory_and_file_urls_count_and_iterate(shard_dir, memory_root):
    url = f"{memory_root}/a.tar"
    write_shard(url, samples(5))
    got, error = read_all(url)
    assert shard_sample_count(url) == ShardCount(5, "scan") and len(got) == 5 and error is None
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{memory_root}/shardindex.json".replace("memory://", "/"), json.dumps({"shardlist": [{"url": "a.tar", "nsamples": 5}]}).encode())
    assert shard_sample_count(url) == ShardCount(5, "index")
    file_url = f"file://{shard_dir}/002.tar"
    assert shard_sample_count(file_url) == ShardCount(4, "scan")
    assert [s.key for s in read_all(file_url)[0]] == [f"s{i:05d}" for i in range(8, 12)]


def test_gzip_and_pipe_shards(shard_dir, tmp_path):
    gz = tmp_path / "z.tar.gz"
    gz.write_bytes(gzip.compress((shard_dir / "000.tar").read_bytes(), mtime=0))
    assert scan_sample_count(str(gz)) == ShardCount(4, "scan")
    assert [s.key for s in read_all(str(gz))[0]] == keys_by_webdataset(str(shard_dir / "000.tar"))
    pipe = f"pipe:cat {shard_dir}/001.tar"
    assert shard_sample_count(pipe) == ShardCount(4, "scan")
    got, error = read_all(pipe)
    assert len(got) == 4 and error is None
    with iter_shard_samples(pipe) as it:  # stopping early kills the command without hanging
        next(it)
    with pytest.raises(DataError, match="exited with status 3"):
        list(iter_shard_samples(f"pipe:cat {shard_dir}/001.tar; exit 3"))


# ----------------------------------------------------------------------------------------------
# Samples


def test_sample_fields_from_members(tmp_path):
    png = image_bytes(0)
    path = str(tmp_path / "fields.tar")
    write_shard(
        path,
        [
            {"__key__": "a", "png": png, "cls": 7, "txt": "a red square", "json": {"label": 1, "caption": "x"}},
            {"__key__": "b", "jpeg": image_bytes(1, "JPEG"), "json": {"label": 2, "caption": "from json"}},
            {"__key__": "c", "0.webp": b"W", "json": {"text": "text key", "label": "cat"}},
            {"__key__": "d", "txt": "only text"},
            {"__key__": "e", "png": png, "cls": "x7", "json": [1, 2]},
        ],
    )
    a, b, c, d, e = read_all(path)[0]
    assert (a.image_bytes, a.label, a.caption, a.meta, a.error) == (png, 7, "a red square", {"label": 1, "caption": "x"}, None)
    assert (b.label, b.caption, b.error) == (2, "from json", None)
    assert (c.image_bytes, c.label, c.caption) == (b"W", None, "text key")
    assert (d.image_bytes, d.caption, d.error) == (None, "only text", "no image member")
    assert decode_or_error(d) == (None, "sample d: no image member")
    # A bad cls or json member flags the metadata and keeps the good image.
    assert e.error is None and e.label is None and e.image_bytes == png
    assert "cls member is not an integer" in e.meta_error and "json member is not an object" in e.meta_error
    image, error = decode_or_error(e)
    assert image is not None and error is None


def test_corrupt_image_fails_only_that_sample(tmp_path):
    rows = samples(3)
    rows[1] = {"__key__": "broken", "jpg": b"this is not a jpeg", "cls": 1}
    path = str(tmp_path / "corrupt.tar")
    write_shard(path, rows)
    got, error = read_all(path)
    assert error is None and [r.error for r in got] == [None, None, None]
    decoded = [decode_or_error(r) for r in got]
    assert decoded[0][1] is None and decoded[2][1] is None
    assert decoded[0][0].mode == "RGB" and decoded[0][0].size == (8, 8)
    assert decoded[1][0] is None
    assert decoded[1][1] == "sample broken: cannot decode image: UnidentifiedImageError: cannot identify image file <image bytes>"
    with pytest.raises(DataError, match="UnidentifiedImageError"):
        decode_image(b"garbage")


def test_decode_matches_pil_and_converts_modes():
    pixels = np.random.default_rng(3).integers(0, 256, size=(8, 8, 4), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, format="PNG")
    decoded = decode_image(buffer.getvalue())
    assert decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), pixels[..., :3])


def test_truncated_tar_keeps_earlier_samples_and_records_error(tmp_path):
    full = str(tmp_path / "full.tar")
    write_shard(full, samples(4))
    data = open(full, "rb").read()
    with tarfile.open(full) as tf:
        third = [m for m in tf.getmembers() if m.name.startswith("s00002.")][0]
    cut = str(tmp_path / "cut.tar")
    with open(cut, "wb") as f:
        f.write(data[: third.offset_data + third.size // 2])  # inside the third sample's image
    got, error = read_all(cut)
    assert [s.key for s in got] == ["s00000", "s00001"]
    assert error.startswith("truncated after 2 samples: unexpected end of data")
    count = shard_sample_count(cut)
    assert (count.count, count.source, count.error) == (2, "scan-truncated", error)


def test_every_cut_point_agrees_between_scan_and_iteration(tmp_path):
    full = str(tmp_path / "full.tar")
    write_shard(full, samples(3))
    data = open(full, "rb").read()
    keys = keys_by_webdataset(full)
    with tarfile.open(full) as tf:
        end_of_members = max(m.offset_data + m.size for m in tf.getmembers())
    padded_end = -(-end_of_members // 512) * 512
    cut = str(tmp_path / "cut.tar")
    special = [end_of_members, padded_end - 1, padded_end, padded_end + 511, padded_end + 512, len(data)]
    for length in [*range(0, len(data), 37), *special]:
        with open(cut, "wb") as f:
            f.write(data[:length])
        got, error = read_all(cut)
        with open(cut, "rb") as stream:  # sequential scan, as used for pipes and compressed shards
            walker = walk_tar_groups(stream, read=lambda suffix: False, seek=False)
            streamed = []
            try:
                while True:
                    streamed.append(next(walker).key)
            except StopIteration as stop:
                stream_reason = stop.value
        count = shard_sample_count(cut)
        assert count.count == len(got) == len(streamed), length
        assert [s.key for s in got] == streamed == keys[: len(got)], length
        assert (count.error is None) == (error is None) == (stream_reason is None), length
        # Complete exactly when the first end-of-archive zero block is whole.
        if length >= padded_end + 512:
            assert error is None and count == ShardCount(3, "scan"), length
        else:
            assert error is not None and count.source == "scan-truncated", length
            assert count.count < 3, length  # the sample in progress at the cut is dropped


def test_empty_tar_and_empty_file(tmp_path):
    empty_tar = str(tmp_path / "empty.tar")
    assert write_shard(empty_tar, []) == 0
    assert shard_sample_count(empty_tar) == ShardCount(0, "scan")
    assert read_all(empty_tar) == ([], None)
    zero = tmp_path / "zero.tar"
    zero.write_bytes(b"")
    count = shard_sample_count(str(zero))
    assert (count.count, count.source) == (0, "scan-truncated") and "empty file" in count.error
    got, error = read_all(str(zero))
    assert got == [] and error == count.error
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x07" * 2000)
    assert shard_sample_count(str(garbage)).source == "scan-truncated"


def test_grouping_edge_cases_match_webdataset(tmp_path):
    png = image_bytes(0)
    members = [
        ("__index__", b"meta"),
        ("dir/a.png", png),
        ("dir/a.TXT", b"upper-case suffix"),
        ("README", b"no dot: ignored"),
        ("dir/b.png", png),
        ("dir/a.png", png),  # key a again, not consecutive: a new sample
        ("dir/a.seg.png", png),
        ("c.d.e.png", png),
    ]
    path = tmp_path / "edge.tar"
    path.write_bytes(raw_tar(members))
    got, error = read_all(str(path))
    assert error is None
    assert [s.key for s in got] == keys_by_webdataset(str(path)) == ["dir/a", "dir/b", "dir/a", "c"]
    assert got[0].caption == "upper-case suffix"
    assert shard_sample_count(str(path)) == ShardCount(4, "scan")
    # A repeated member inside one sample: webdataset refuses it; we flag that sample only.
    path.write_bytes(raw_tar([("a.png", png), ("a.png", png), ("b.png", png)]))
    got, _ = read_all(str(path))
    assert [(s.key, s.error) for s in got] == [("a", "duplicate member 'a.png'"), ("b", None)]
    assert shard_sample_count(str(path)).count == 2


def test_expected_count_guards_rows(tmp_path):
    path = str(tmp_path / "five.tar")
    write_shard(path, samples(5))
    got, error = read_all(path, expected_count=3)
    assert [s.index_in_shard for s in got] == [0, 1, 2]
    assert "holds 5 samples but 3 were counted" in error and "the last 2 were skipped" in error
    got, error = read_all(path, expected_count=7)
    assert len(got) == 5 and error == "shard ended after 5 of the 7 samples counted for it"
    assert read_all(path, expected_count=5)[1] is None
    with pytest.raises(ConfigError, match="expected_count"):
        iter_shard_samples(path, expected_count=-1)


def test_missing_shard_raises_data_error_naming_it(tmp_path, memory_root):
    for url in (str(tmp_path / "gone.tar"), f"{memory_root}/gone.tar"):
        with pytest.raises(DataError, match="gone.tar"):
            list(iter_shard_samples(url))
        with pytest.raises(DataError, match="gone.tar"):
            shard_sample_count(url)


# ----------------------------------------------------------------------------------------------
# Writing


def test_write_shard_is_deterministic_and_roundtrips(tmp_path):
    pixels = np.random.default_rng(5).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    rows = [{"__key__": "k0", "png": Image.fromarray(pixels), "cls": 4, "txt": "t", "json": {"b": 1, "a": 2}}]
    first, second = str(tmp_path / "1.tar"), str(tmp_path / "2.tar")
    assert write_shard(first, rows) == write_shard(second, rows) == 1
    assert open(first, "rb").read() == open(second, "rb").read()
    with tarfile.open(first) as tf:
        info = tf.getmembers()
        assert [m.name for m in info] == ["k0.png", "k0.cls", "k0.txt", "k0.json"]
        assert {(m.mtime, m.uid, m.gid) for m in info} == {(0, 0, 0)}
    (sample,) = read_all(first)[0]
    np.testing.assert_array_equal(np.asarray(decode_image(sample.image_bytes)), pixels)
    assert (sample.label, sample.caption, sample.meta) == (4, "t", {"a": 2, "b": 1})
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
    with pytest.raises(ConfigError, match="__key__"):
        write_shard(str(tmp_path / "bad.tar"), [{"__key__": "a.b", "png": b""}])
    assert not (tmp_path / "bad.tar").exists()
