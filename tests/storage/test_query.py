"""Read side: key/row lookup, top-k, one image's tensors, exports, status."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from storage_helpers import COUNTS, ROWS_PER_CHUNK, filled_store

from clipscope.errors import ConfigError, StoreError
from clipscope.storage.layout import plan_row_blocks
from clipscope.storage.query import (
    export_rows,
    image_array_names,
    open_run,
    read_image,
    rows_for_keys,
    sample_info,
    topk_rows,
)
from clipscope.storage.status import format_status, store_status


@pytest.fixture
def run(tmp_path):
    store = filled_store(str(tmp_path / "run.zarr"))
    for block in plan_row_blocks(COUNTS, ROWS_PER_CHUNK):
        rows = [
            {"row": block.start + i, "key": f"s{block.index}/{i}", "shard": f"shard-{block.index}.tar",
             "label": i, "caption": f"img {i}", "error": "bad jpeg" if (block.index, i) == (2, 6) else None}
            for i in range(block.count)
        ]
        store.write_samples_part(block.index, rows)
        if block.count:
            store.mark_shard_done(block.index, {"url": f"shard-{block.index}.tar", "count": block.count,
                                                "valid": block.count, "errors": 0, "seconds": 2.0,
                                                "checksum": store.rows_checksum(block.start, block.capacity)})
    store.mark_shard_failed(1, {"url": "shard-1.tar", "error": "empty shard"})
    store.merge_samples()
    return open_run(store.url)


def test_lookup_by_key_and_row(run):
    np.testing.assert_array_equal(rows_for_keys(run, ["s2/0", "s0/4", "s0/0"]), [8, 4, 0])
    with pytest.raises(StoreError, match=r"1 sample key\(s\) not in .*\['nope'\]"):
        rows_for_keys(run, ["s2/0", "nope"])
    info = sample_info(run, [9, 0])
    assert info["key"].to_pylist() == ["s2/1", "s0/0"] and info["shard_index"].to_pylist() == [2, 0]
    with pytest.raises(StoreError, match=r"rows \[5\] .* no entry"):
        sample_info(run, [5])
    with pytest.raises(ConfigError, match=r"rows must lie in \[0, 16\)"):
        sample_info(run, [16])


def _reference_topk(scores, k, valid):
    candidates = [(-s, r) for r, s in enumerate(scores) if valid[r] and not np.isnan(s)]
    return [r for _, r in sorted(candidates)[:k]]


def test_topk_rows_matches_a_sort_with_ties_nan_and_invalid():
    rng = np.random.default_rng(0)
    for trial in range(50):
        n = int(rng.integers(1, 40))
        scores = rng.integers(0, 5, n).astype(np.float32)  # many ties
        scores[rng.random(n) < 0.1] = np.nan
        valid = rng.random(n) < 0.8
        k = int(rng.integers(1, n + 3))
        assert topk_rows(scores, k, valid).tolist() == _reference_topk(scores, k, valid), trial
    assert topk_rows(np.array([3, 1, 2]), 2).tolist() == [0, 2]
    with pytest.raises(ConfigError, match="k must be an integer ≥ 1, got 0"):
        topk_rows(np.zeros(3), 0)
    with pytest.raises(ConfigError, match="valid must be a bool array of shape"):
        topk_rows(np.zeros(3), 1, np.ones(2, bool))


def test_read_image_by_row_and_key(run):
    names = image_array_names(run)
    assert names == ["direct/bias", "direct/embedding", "direct/heads", "direct/mlps", "image_embedding"]
    by_key = read_image(run, "s2/3")
    by_row = read_image(run, 11)
    assert sorted(by_key) == names
    for name in names:
        np.testing.assert_array_equal(by_key[name], run.read(name, 11))
        np.testing.assert_array_equal(by_row[name], by_key[name])
    assert by_key["direct/heads"].shape == (2, 3, 6)
    with pytest.raises(StoreError, match=r"row 5 .* no decoded sample \(valid=False\)"):
        read_image(run, 5)
    assert read_image(run, 5, ["image_embedding"], allow_invalid=True)["image_embedding"].shape == (6,)


def test_export_parquet_and_npy(run, tmp_path):
    rows = np.array([9, 0, 3])
    names = ["image_embedding", "direct/heads", "valid"]
    dest = export_rows(run, rows, names, str(tmp_path / "out" / "sel.parquet"))
    table = pq.read_table(dest)
    assert table["row"].to_pylist() == [9, 0, 3] and table["key"].to_pylist() == ["s2/1", "s0/0", "s0/3"]
    heads = table["direct/heads"]
    assert heads.type.shape == [2, 3, 6] and heads.type.dim_names == ["layer", "head", "embed"]
    np.testing.assert_array_equal(heads.combine_chunks().to_numpy_ndarray(), run.read("direct/heads", rows))
    assert table["valid"].to_pylist() == [True, True, True]
    folder = export_rows(run, rows, names[:2], f"file://{tmp_path / 'npy'}")
    assert folder.endswith("npy")
    index = json.loads((tmp_path / "npy" / "index.json").read_text())
    assert index["arrays"]["direct/heads"] == {"file": "direct__heads.npy", "dims": ["sample", "layer", "head", "embed"]}
    np.testing.assert_array_equal(np.load(tmp_path / "npy" / "rows.npy"), rows)
    np.testing.assert_array_equal(np.load(tmp_path / "npy" / "direct__heads.npy"), run.read("direct/heads", rows))
    with pytest.raises(ConfigError, match="format must be"):
        export_rows(run, rows, names, str(tmp_path / "x"), format="csv")
    with pytest.raises(ConfigError, match="not a per-sample array"):
        export_rows(run, rows, ["second_order/layer_0/directions"], str(tmp_path / "y"))


def test_store_status_and_table(run):
    status = store_status(run.url)
    extract = status["stages"]["extract"]
    assert extract["done"] == 2 and extract["pending"] == [] and extract["samples_done"] == sum(COUNTS)
    assert extract["failed"] == [{"index": 1, "url": "shard-1.tar", "error": "empty shard"}]
    assert status["shards_total"] == 3 and status["samples"] == 12
    assert status["error_counts"] == {"bad jpeg": 1}
    assert (status["valid_rows"], status["invalid_rows"]) == (12, 4)
    assert status["config"]["config.model.name"] == "tiny-vit"
    heads = status["arrays"]["direct/heads"]
    chunk_files = [p for p in Path(run.url, "direct", "heads", "c").rglob("*") if p.is_file()]
    assert heads["chunks_stored"] == len(chunk_files) == 4  # shard 0's 2 chunks + shard 2's 2 chunks
    assert heads["stored_bytes"] == sum(p.stat().st_size for p in chunk_files)
    assert status["arrays"]["second_order/layer_0/directions"]["stored_bytes"] == 0
    text = format_status(status)
    assert "extract  2/3" in text and "bad jpeg" in text and "direct/heads" in text
    assert "failed extract shard 1 shard-1.tar: empty shard" in text
