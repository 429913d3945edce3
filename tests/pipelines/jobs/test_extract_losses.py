"""Shard-level losses are surfaced: a truncated tar, files that are not tar
archives (zero bytes, random bytes), a stale img2dataset `_stats.json` and a `.tar.zst` shard.
Each lossy shard gets a warning line at run time; the run's summary, `clipscope status` and
`status --json` count the samples lost per shard with the reason; the exit code is 3 (data not
all read) unless `--allow-partial`; an unreadable shard is a failed shard (exit 1)."""

from __future__ import annotations

import json
import logging
import os

import pytest
import zstandard

from clipscope.storage.store import RunStore

from extract_helpers import extract_args, run_cli, truncate_inside_sample, write_tiny_shards


@pytest.fixture()
def lossy(tmp_path):
    """shard 0 fine; shard 1 (10 samples) cut after 6; shard 2 (12) with a stats file saying 4."""
    data = write_tiny_shards(tmp_path / "shards", (3, 10, 12), seed=5)
    truncate_inside_sample(data.paths[1], 6)
    stats = os.path.join(data.folder, "shard-002_stats.json")
    with open(stats, "w") as f:
        json.dump({"successes": 4}, f)
    return data


def test_lost_samples_are_warned_counted_and_exit_3(lossy, tmp_path, capsys, caplog, fast_models):
    out = tmp_path / "store.zarr"
    with caplog.at_level(logging.WARNING, logger="clipscope"):
        assert run_cli(*extract_args(lossy.paths, out)) == 3
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "lost" in r.getMessage()]
    assert len(warned) == 2
    assert any("shard 1" in w and "truncated after 6 samples" in w for w in warned)
    assert any("shard 2" in w and "8 sample(s) lost" in w for w in warned)
    printed = capsys.readouterr().out
    assert "2 shard(s) not read whole: 8+ samples lost" in printed
    assert "partial shard 2" in printed and "holds 12 samples but 4 were counted" in printed

    assert run_cli("status", out) == 3
    text = capsys.readouterr().out
    assert "2 done shard(s) not read whole: 8 samples lost, plus an unknown number in 1 truncated shard(s)" in text
    assert "partial extract shard 1" in text and "partial extract shard 2" in text
    assert run_cli("status", out, "--json") == 3
    status = json.loads(capsys.readouterr().out)["stages"]["extract"]
    assert [(p["index"], p["samples_lost"]) for p in status["partial"]] == [(1, None), (2, 8)]
    assert status["samples_lost"] == 8 and status["samples_lost_unknown"] == 1
    assert "truncated after 6 samples" in status["partial"][0]["reason"]

    # Resuming reports the same losses; --allow-partial accepts them.
    assert run_cli(*extract_args(lossy.paths, out)) == 3
    assert run_cli(*extract_args(lossy.paths, out, "--allow-partial")) == 0


@pytest.mark.parametrize("content", [b"", os.urandom(4000)], ids=["zero-bytes", "random-bytes"])
def test_a_file_that_is_not_a_tar_is_a_failed_shard(content, tmp_path, capsys, fast_models):
    data = write_tiny_shards(tmp_path / "shards", (3,), seed=2)
    bad = os.path.join(data.folder, "shard-001.tar")
    with open(bad, "wb") as f:
        f.write(content)
    out = tmp_path / "store.zarr"
    assert run_cli(*extract_args([data.paths[0], bad], out, "--allow-partial")) == 1
    assert f"failed shard 1: {bad} is not a readable tar archive" in capsys.readouterr().out
    records = RunStore.open(str(out), "r").shard_records(stage="extract")
    assert records[0]["status"] == "done" and records[1]["status"] == "failed"
    assert run_cli("status", out) == 1
    assert "failed extract shard 1" in capsys.readouterr().out


def test_a_tar_zst_shard_is_extracted_like_its_tar(tmp_path, capsys, fast_models):
    data = write_tiny_shards(tmp_path / "shards", (5,), seed=4)
    zst = data.paths[0] + ".zst"
    with open(data.paths[0], "rb") as src, open(zst, "wb") as dst:
        dst.write(zstandard.ZstdCompressor().compress(src.read()))
    plain, compressed = tmp_path / "plain.zarr", tmp_path / "zst.zarr"
    assert run_cli(*extract_args(data.paths[0], plain)) == 0
    assert run_cli(*extract_args(zst, compressed)) == 0
    a, b = RunStore.open(str(plain), "r"), RunStore.open(str(compressed), "r")
    assert b.shard_records(stage="extract")[0]["count"] == 5
    assert (a.read("image_embedding") == b.read("image_embedding")).all()


def test_a_bad_cls_keeps_the_image_and_flags_the_metadata(tmp_path, fast_models):
    import io

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from clipscope.pipelines.data.webdataset_input import write_shard

    def png(value: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.full((20, 20, 3), value, np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    path = str(tmp_path / "shard.tar")
    write_shard(path, [{"__key__": "good", "png": png(10), "cls": 3},
                       {"__key__": "badcls", "png": png(90), "cls": "x7", "txt": "kept caption"},
                       {"__key__": "badjson", "png": png(170), "json": b"{not json"}])
    out = tmp_path / "store.zarr"
    assert run_cli(*extract_args(path, out)) == 0
    store = RunStore.open(str(out), "r")
    assert store.read_valid()[:3].tolist() == [True, True, True]
    rows = pq.read_table(os.path.join(out, "samples.parquet")).to_pylist()
    assert [r["label"] for r in rows] == [3, -1, -1] and rows[1]["caption"] == "kept caption"
    assert rows[0]["error"] is None
    assert "metadata ignored, image kept: cls member is not an integer" in rows[1]["error"]
    assert "metadata ignored, image kept: json member is not valid JSON" in rows[2]["error"]
