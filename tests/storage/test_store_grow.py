"""A store grows along `sample` (extraction of added shards): rows kept, new rows empty and not valid,
the resize idempotent so that a writer killed mid-grow can grow again."""

from __future__ import annotations

import numpy as np
import pytest
from storage_helpers import ROWS_PER_CHUNK, filled_store

from clipscope.errors import ConfigError
from clipscope.storage.store import RunStore


def test_grow_keeps_rows_and_adds_invalid_ones(store_url):
    store = filled_store(store_url)
    before = {name: store.read(name) for name in store.array_names(per_sample=True)}
    n = store.n_rows
    store.grow(n + 2 * ROWS_PER_CHUNK, {"shards": ["a", "b"]})
    store.grow(n + 2 * ROWS_PER_CHUNK, {"shards": ["a", "b"]})  # again: a no-op
    again = RunStore.open(store_url, "r")
    assert again.n_rows == n + 2 * ROWS_PER_CHUNK and again.attrs["shards"] == ["a", "b"]
    for name, values in before.items():
        grown = again.read(name)
        assert grown.shape[0] == again.n_rows and again.dims(name)[0] == "sample"
        np.testing.assert_array_equal(grown[:n], values)
        assert not grown[n:].any()
    assert not again.read_valid()[n:].any()


@pytest.mark.parametrize("rows,attrs,message", [
    (-1, {}, "grows to a multiple of rows_per_chunk"),
    (1, {}, "grows to a multiple of rows_per_chunk"),
    (None, {"n_rows": 3}, "reserved keys"),
])
def test_grow_refuses_bad_sizes_and_reserved_keys(store_url, rows, attrs, message):
    store = filled_store(store_url)
    with pytest.raises(ConfigError, match=message):
        store.grow(store.n_rows + ROWS_PER_CHUNK if rows is None else store.n_rows + rows, attrs)
