"""The RunStore contract, run against every backend: local path, file:// URL, memory:// URL."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import zarr
from storage_helpers import ATTRS, COUNTS, ROWS_PER_CHUNK, SPECS, block_rows, filled_store, raw_objects

from clipscope.errors import ConfigError, StoreError
from clipscope.storage.layout import SCHEMA_ATTR, SCHEMA_VERSION, ArraySpec, plan_row_blocks
from clipscope.storage.location import Location
from clipscope.storage.store import RunStore


def model_of(name: str) -> np.ndarray:
    """What the filled store must hold in a per-sample array, built with numpy alone."""
    blocks = plan_row_blocks(COUNTS, ROWS_PER_CHUNK)
    parts = []
    for block in blocks:
        arrays, valid = block_rows(block, seed=block.index)
        parts.append(valid if name == "valid" else arrays[name])
    return np.concatenate(parts)


def test_create_open_attrs_round_trip(store_url):
    filled_store(store_url)
    store = RunStore.open(store_url)
    assert store.url == store_url
    attrs = store.attrs
    for key, value in ATTRS.items():
        assert attrs[key] == value
    assert attrs[SCHEMA_ATTR] == SCHEMA_VERSION
    assert store.n_rows == 16 and store.rows_per_chunk == ROWS_PER_CHUNK
    assert store.array_names() == sorted([s.name for s in SPECS] + ["valid"])
    assert store.array_names(per_sample=False) == ["second_order/layer_0/directions"]
    for spec in SPECS:
        assert store.spec(spec.name) == spec
        arr = store.array(spec.name)
        if spec.per_sample:
            assert arr.chunks == (ROWS_PER_CHUNK, *spec.shape_tail)
        assert arr.fill_value == 0


def test_every_array_declares_dimension_names(store_url):
    store = filled_store(store_url)
    location = store.location
    for name in store.array_names():
        meta = json.loads(location.read_bytes(name, "zarr.json"))
        dims = meta["dimension_names"]
        assert dims is not None and all(isinstance(d, str) and d for d in dims)
        assert len(dims) == len(meta["shape"])
        if store.is_per_sample(name):
            assert dims[0] == "sample" and meta["shape"][0] == store.n_rows


def test_write_then_read_matches_numpy_model(store_url):
    filled_store(store_url)
    store = RunStore.open(store_url)
    for name in ["image_embedding", "direct/heads", "second_order/layer_0/weights", "valid"]:
        expected = model_of(name)
        np.testing.assert_array_equal(store.read(name), expected)
        np.testing.assert_array_equal(store.read(name, slice(3, 11)), expected[3:11])
        picks = np.array([15, 0, 3, 3, -1, 8])
        np.testing.assert_array_equal(store.read(name, picks), expected[picks])
        mask = expected.reshape(16, -1).any(axis=1)
        np.testing.assert_array_equal(store.read(name, mask), expected[mask])
        np.testing.assert_array_equal(store.read(name, 9), expected[9])
        assert store.read(name, np.array([], dtype=np.int64)).shape == (0, *expected.shape[1:])
    np.testing.assert_array_equal(store.read_valid(), model_of("valid"))
    assert store.read_valid().sum() == sum(COUNTS)


def test_rewrite_gives_identical_bytes(store_url):
    store = filled_store(store_url)
    before = raw_objects(store)
    assert any("/c/" in path for path in before)  # chunks were written, so the comparison means something
    for block in plan_row_blocks(COUNTS, ROWS_PER_CHUNK):
        if block.capacity:
            arrays, valid = block_rows(block, seed=block.index)
            store.write_rows(block.start, arrays, valid)
    assert raw_objects(store) == before
    block = plan_row_blocks(COUNTS, ROWS_PER_CHUNK)[2]
    arrays, valid = block_rows(block, seed=99)
    store.write_rows(block.start, arrays, valid)
    assert raw_objects(store) != before


def test_pickle_round_trip_reopens_lazily(store_url):
    store = filled_store(store_url)
    reader = RunStore.open(store_url)
    reader.read("direct/heads")  # populate caches; they must not travel
    payload = pickle.dumps(reader)
    assert len(payload) < 500
    clone = pickle.loads(payload)
    assert clone.url == store.url and clone.mode == "r" and clone.storage_options is None
    np.testing.assert_array_equal(clone.read("direct/heads"), model_of("direct/heads"))
    writer = pickle.loads(pickle.dumps(RunStore.open(store_url, mode="r+")))
    block = plan_row_blocks(COUNTS, ROWS_PER_CHUNK)[0]
    arrays, valid = block_rows(block, seed=0)
    writer.write_rows(0, arrays, valid)
    with pytest.raises(StoreError, match="read-only"):
        clone.write_rows(0, arrays, valid)


def test_misaligned_and_malformed_writes_are_refused(store_url):
    store = filled_store(store_url)
    block = plan_row_blocks(COUNTS, ROWS_PER_CHUNK)[0]
    arrays, valid = block_rows(block, seed=0)
    with pytest.raises(StoreError, match=r"multiple of rows_per_chunk=4 .*got 2"):
        store.write_rows(2, arrays, valid)
    short = {k: v[:6] for k, v in arrays.items()}
    with pytest.raises(StoreError, match=r"multiple of rows_per_chunk=4, got 6"):
        store.write_rows(0, short, valid[:6])
    with pytest.raises(StoreError, match=r"exceed the store's n_rows=16"):
        store.write_rows(12, arrays, valid)
    with pytest.raises(StoreError, match=r"shape \(8, 6\), got \(8, 5\)"):
        store.write_rows(0, {"image_embedding": np.zeros((8, 5), np.float32)}, valid)
    with pytest.raises(StoreError, match="same number of rows"):
        store.write_rows(0, {"image_embedding": np.zeros((4, 6), np.float32)}, valid)
    with pytest.raises(StoreError, match="1-d bool"):
        store.write_rows(0, arrays, valid.astype(np.int8))
    with pytest.raises(StoreError, match="not a per-sample array"):
        store.write_rows(0, {"second_order/layer_0/directions": np.zeros((8, 3, 4, 6))}, valid)
    with pytest.raises(StoreError, match="castable to float32, got complex128"):
        store.write_rows(0, {"image_embedding": np.zeros((8, 6), complex)}, valid)
    with pytest.raises(StoreError, match="no array 'direct/nope'"):
        store.write_rows(0, {"direct/nope": np.zeros((8, 6))}, valid)


def test_missing_or_foreign_store_is_a_clear_error(store_url):
    with pytest.raises(StoreError, match=rf"no run store at {store_url}: the location does not exist"):
        RunStore.open(store_url)
    location = Location(store_url)
    location.write_bytes_atomic(b"x", "notes.txt")
    with pytest.raises(StoreError, match=rf"no run store at {store_url}: the location has no zarr.json"):
        RunStore.open(store_url)
    zarr.create_group(location.zarr_store(read_only=False), zarr_format=3, attributes={"x": 1})
    with pytest.raises(StoreError, match=rf"{store_url} is a zarr group but not a clipscope run store"):
        RunStore.open(store_url)


def test_create_refuses_existing_store_but_tolerates_a_lock_file(store_url):
    Location(store_url).write_bytes_atomic(b"{}", "lock.json")
    filled_store(store_url)
    with pytest.raises(StoreError, match=r"refusing to create .* not empty \(found .*zarr.json"):
        filled_store(store_url)


def test_results_round_trip_and_overwrite_rules(store_url):
    store = filled_store(store_url)
    mean = np.arange(6, dtype=np.float64)
    store.write_result("reductions/mean", mean, ("embed",), attrs={"what": "mean over valid rows"})
    reader = RunStore.open(store_url)
    np.testing.assert_array_equal(reader.read_result("reductions/mean"), mean)
    assert reader.dims("reductions/mean") == ("embed",)
    assert reader.array("reductions/mean").attrs["what"] == "mean over valid rows"
    assert not reader.is_per_sample("reductions/mean")
    store.write_result("reductions/mean", mean + 1)  # same shape: rewritten in place, dims kept
    np.testing.assert_array_equal(RunStore.open(store_url).read_result("reductions/mean"), mean + 1)
    store.write_result("reductions/mean", np.ones((2, 6)), ("layer", "embed"))  # replaced
    assert RunStore.open(store_url).read_result("reductions/mean").shape == (2, 6)
    with pytest.raises(StoreError, match="already exists"):
        store.write_result("reductions/mean", mean, ("embed",), overwrite=False)
    with pytest.raises(ConfigError, match="dims are required"):
        store.write_result("reductions/new", mean)
    with pytest.raises(StoreError, match="per-sample array"):
        store.write_result("direct/heads", np.zeros((16, 2, 3, 6)), ("sample", "layer", "head", "embed"))
    with pytest.raises(ConfigError, match=r"'embed' has length 5 in 'reductions/bad' but 6 in"):
        store.write_result("reductions/bad", np.zeros(5), ("embed",))
    directions = np.random.default_rng(0).standard_normal((1, 3, 4, 6)).astype(np.float32)
    store.write_result("second_order/layer_0/directions", directions)
    np.testing.assert_array_equal(store.read_result("second_order/layer_0/directions"), directions)
    with pytest.raises(StoreError, match="read-only"):
        RunStore.open(store_url).write_result("reductions/x", mean, ("embed",))


def test_add_arrays_is_idempotent_and_checks_specs(store_url):
    store = filled_store(store_url)
    extra = ArraySpec("second_order/layer_1/weights", ("sample", "later_layer", "head", "neuron"), (0, 3, 4), "float16")
    store.add_arrays([extra])
    store.add_arrays([extra])
    assert RunStore.open(store_url).spec(extra.name) == extra
    with pytest.raises(StoreError, match="already exists"):
        store.add_arrays([ArraySpec(extra.name, extra.dims, (1, 3, 4), "float16")])
    with pytest.raises(ConfigError, match="'head' has length 2 in 'direct/other' but 3"):
        store.add_arrays([ArraySpec("direct/other", ("sample", "head"), (2,), "float32")])
    # only the new array's rows, the validity mask untouched
    store.write_rows(0, {extra.name: np.ones((8, 0, 3, 4), np.float16)}, None)
    np.testing.assert_array_equal(store.read_valid(), model_of("valid"))


def test_update_attrs_merges_and_protects_layout_keys(store_url):
    store = filled_store(store_url)
    store.update_attrs({"finished": True})
    attrs = RunStore.open(store_url).attrs
    assert attrs["finished"] is True and attrs["code_version"] == ATTRS["code_version"]
    with pytest.raises(ConfigError, match="reserved keys"):
        store.update_attrs({"n_rows": 3})
    with pytest.raises(ConfigError, match="JSON"):
        store.update_attrs({"x": np.float32(1)})


def test_sharded_layout_is_aligned_and_idempotent(tmp_path):
    url = str(tmp_path / "sharded.zarr")
    store = filled_store(url, rows_per_inner_chunk=2)
    arr = store.array("direct/heads")
    assert arr.shards == (4, 2, 3, 6) and arr.chunks == (2, 2, 3, 6)
    np.testing.assert_array_equal(store.read("direct/heads", np.array([13, 2])), model_of("direct/heads")[[13, 2]])
    before = raw_objects(store)
    for block in plan_row_blocks(COUNTS, ROWS_PER_CHUNK):
        if block.capacity:
            store.write_rows(block.start, *block_rows(block, seed=block.index))
    assert raw_objects(store) == before


def test_create_validates_its_parameters(tmp_path):
    url = str(tmp_path / "x.zarr")
    with pytest.raises(ConfigError, match="multiple of rows_per_chunk=4"):
        RunStore.create(url, arrays=SPECS, n_rows=10, rows_per_chunk=4, attrs={})
    with pytest.raises(ConfigError, match="rows_per_chunk must be an integer ≥ 1, got 0"):
        RunStore.create(url, arrays=SPECS, n_rows=0, rows_per_chunk=0, attrs={})
    with pytest.raises(ConfigError, match="reserved keys"):
        RunStore.create(url, arrays=SPECS, n_rows=8, rows_per_chunk=4, attrs={"n_rows": 8})
    with pytest.raises(ConfigError, match="duplicates"):
        RunStore.create(url, arrays=SPECS + SPECS[:1], n_rows=8, rows_per_chunk=4, attrs={})
    with pytest.raises(ConfigError, match="'embed' has length 6 in 'image_embedding' but 5 in 'x'"):
        RunStore.create(
            url, arrays=SPECS + [ArraySpec("x", ("sample", "embed"), (5,), "float32")], n_rows=8, rows_per_chunk=4, attrs={}
        )
    with pytest.raises(ConfigError, match="divisor of rows_per_chunk=4"):
        RunStore.create(url, arrays=SPECS, n_rows=8, rows_per_chunk=4, attrs={}, rows_per_inner_chunk=3)
    with pytest.raises(ConfigError, match="storage_options apply to fsspec URLs"):
        RunStore.create(url, arrays=SPECS, n_rows=8, rows_per_chunk=4, attrs={}, storage_options={"a": 1})
    assert not (tmp_path / "x.zarr").exists()
