"""Shard manifest (atomic records, done/failed/clear, checksums) and the Parquet sample index."""

from __future__ import annotations

import numpy as np
import pytest
from storage_helpers import COUNTS, ROWS_PER_CHUNK, block_rows, filled_store, make_url

from clipscope.errors import ConfigError, StoreError
from clipscope.storage import location as location_module
from clipscope.storage.layout import plan_row_blocks
from clipscope.storage.manifest import rows_checksum
from clipscope.storage.sample_index import SCHEMA, read_samples
from clipscope.storage.store import RunStore


def done_record(**extra):
    return {"url": "shard-a.tar", "count": 5, "valid": 4, "errors": 1, "seconds": 1.5, "checksum": "abc", **extra}


def test_done_failed_clear_cycle(store_url):
    store = filled_store(store_url)
    assert store.shard_records() == {}
    store.mark_shard_failed(2, {"url": "shard-c.tar", "error": "OSError: truncated tar"})
    store.mark_shard_done(0, done_record(start=0, capacity=8))
    records = RunStore.open(store_url).shard_records()
    assert sorted(records) == [0, 2]
    assert records[0]["status"] == "done" and records[0]["index"] == 0 and records[0]["capacity"] == 8
    assert records[2] == {**records[2], "status": "failed", "error": "OSError: truncated tar"}
    store.mark_shard_done(2, done_record(url="shard-c.tar"))  # a retry succeeded: the failure is gone
    assert {i: r["status"] for i, r in store.shard_records().items()} == {0: "done", 2: "done"}
    assert store.location.list_names("manifest", "extract") == ["done-000000.json", "done-000002.json"]
    store.mark_shard_failed(0, {"url": "shard-a.tar", "error": "worker died"})
    assert store.shard_records()[0]["status"] == "failed"
    store.clear_shard(0)
    store.clear_shard(1)  # nothing to clear is fine
    assert sorted(store.shard_records()) == [2]
    assert store.shard_records(stage="neurons") == {}
    store.mark_shard_done(2, done_record(), stage="neurons")
    assert sorted(store.shard_records(stage="neurons")) == [2]


def test_records_are_validated(tmp_path):
    store = filled_store(str(tmp_path / "run.zarr"))
    with pytest.raises(ConfigError, match=r"misses keys \['checksum'\]"):
        store.mark_shard_done(0, {k: v for k, v in done_record().items() if k != "checksum"})
    with pytest.raises(ConfigError, match="'count' of shard 0 must be an integer ≥ 0, got -1"):
        store.mark_shard_done(0, done_record(count=-1))
    with pytest.raises(ConfigError, match="JSON-serialisable"):
        store.mark_shard_done(0, done_record(seconds=np.float32(1)))
    with pytest.raises(ConfigError, match="shard index must be an integer ≥ 0"):
        store.mark_shard_done(-1, done_record())
    with pytest.raises(ConfigError, match="stage must be"):
        store.mark_shard_done(0, done_record(), stage="../x")
    with pytest.raises(StoreError, match="read-only"):
        RunStore.open(store.url).mark_shard_done(0, done_record())


def test_record_write_is_atomic_when_interrupted(tmp_path, monkeypatch):
    store = filled_store(str(tmp_path / "run.zarr"))
    store.mark_shard_done(0, done_record(checksum="first"))

    def crash(fd):
        raise OSError("disk vanished")

    monkeypatch.setattr(location_module.os, "fsync", crash)
    with pytest.raises(OSError, match="disk vanished"):
        store.mark_shard_done(0, done_record(checksum="second"))
    monkeypatch.undo()
    assert store.shard_records()[0]["checksum"] == "first"  # old record intact, never half-written
    assert store.location.list_names("manifest", "extract") == ["done-000000.json"]  # no temp left
    # a leftover temp file of a killed writer is not a record
    (tmp_path / "run.zarr" / "manifest" / "extract" / ".done-000001.json.1234.tmp").write_text("{")
    assert sorted(store.shard_records()) == [0]


def test_corrupt_record_is_a_clear_error(tmp_path):
    store = filled_store(str(tmp_path / "run.zarr"))
    store.location.write_bytes_atomic(b"{not json", "manifest", "extract", "done-000003.json")
    with pytest.raises(StoreError, match="corrupt manifest record .*done-000003.json"):
        store.shard_records()


def test_rows_checksum_is_stable_across_backends_and_sensitive(tmp_path):
    block = plan_row_blocks(COUNTS, ROWS_PER_CHUNK)[2]
    sums = []
    for kind in ("memory", "local"):
        store = filled_store(make_url(kind, tmp_path))
        sums.append(rows_checksum(store, block.start, block.capacity))
        if kind == "memory":
            store.location.fs.rm(store.location.root, recursive=True)
    assert sums[0] == sums[1] and len(sums[0]) == 64
    store.write_rows(block.start, *block_rows(block, seed=block.index))
    assert store.rows_checksum(block.start, block.capacity) == sums[0]
    arrays, valid = block_rows(block, seed=block.index)
    arrays["direct/heads"][0, 0, 0, 0] += 1
    store.write_rows(block.start, arrays, valid)
    assert store.rows_checksum(block.start, block.capacity) != sums[0]
    only = store.rows_checksum(block.start, block.capacity, names=["image_embedding"])
    assert only != store.rows_checksum(block.start, block.capacity)
    assert store.rows_checksum(0, 0) == store.rows_checksum(8, 0)
    with pytest.raises(StoreError, match="exceed the store's n_rows=16"):
        store.rows_checksum(8, 16)
    with pytest.raises(StoreError, match="not one"):
        store.rows_checksum(0, 4, names=["second_order/layer_0/directions"])


def samples_of(index, start, count, shard):
    return [
        {"row": start + i, "key": f"{shard}-{i:04d}", "shard": shard, "label": i if i % 2 else None,
         "caption": f"a photo {i}" if i % 3 else None, "error": "decode error" if i == 1 else None}
        for i in range(count)
    ]


def test_sample_index_parts_merge_and_read(store_url):
    store = filled_store(store_url)
    blocks = plan_row_blocks(COUNTS, ROWS_PER_CHUNK)
    for block in reversed(blocks):
        store.write_samples_part(block.index, samples_of(block.index, block.start, block.count, f"s{block.index}"))
    parts = read_samples(store)
    assert parts.schema == SCHEMA
    assert parts["row"].to_pylist() == [0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 14]
    assert parts["shard_index"].to_pylist() == [0] * 5 + [2] * 7
    assert parts["label"].to_pylist()[:4] == [-1, 1, -1, 3]
    assert parts["caption"].to_pylist()[:4] == [None, "a photo 1", "a photo 2", None]
    assert parts["error"].null_count == 12 - 2
    merged = store.merge_samples()
    assert merged.equals(parts)
    first = store.location.read_bytes("samples.parquet")
    store.merge_samples()
    assert store.location.read_bytes("samples.parquet") == first  # idempotent
    assert RunStore.open(store_url).read_samples().equals(parts)
    # a rewritten shard invalidates the merged file until the next merge
    store.write_samples_part(0, samples_of(0, 0, 3, "s0"))
    assert store.location.read_bytes("samples.parquet") is None
    assert read_samples(store).num_rows == 10


def test_sample_index_rejects_bad_rows(tmp_path):
    store = filled_store(str(tmp_path / "run.zarr"))
    with pytest.raises(ConfigError, match="misses 'key'"):
        store.write_samples_part(0, [{"row": 0, "shard": "s"}])
    with pytest.raises(ConfigError, match="label must be an integer or None"):
        store.write_samples_part(0, [{"row": 0, "key": "k", "shard": "s", "label": "cat"}])
    with pytest.raises(ConfigError, match="must be distinct"):
        store.write_samples_part(0, [{"row": 0, "key": "k", "shard": "s"}] * 2)
    with pytest.raises(ConfigError, match="< n_rows=16"):
        store.write_samples_part(0, [{"row": 16, "key": "k", "shard": "s"}])
    store.write_samples_part(1, [])  # an empty shard has an empty part
    store.write_samples_part(0, samples_of(0, 0, 2, "s0"))
    store.write_samples_part(2, samples_of(2, 1, 2, "s2"))  # claims row 1 too
    with pytest.raises(StoreError, match=r"rows claimed by two shards, e.g. \[1\]"):
        store.merge_samples()
    assert read_samples(store).num_rows == 4  # the parts stay readable for inspection
