"""Random shards written in random order; any read of the store equals a numpy model of it."""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from clipscope.storage.layout import ArraySpec, plan_row_blocks, total_rows
from clipscope.storage.store import RunStore

SPECS = [
    ArraySpec("x", ("sample", "embed"), (3,), "float32"),
    ArraySpec("g/y", ("sample", "head", "neuron"), (2, 2), "int16"),
]


@st.composite
def scenario(draw):
    rows_per_chunk = draw(st.integers(1, 5))
    counts = draw(st.lists(st.integers(0, 9), min_size=1, max_size=6))
    order = draw(st.permutations(range(len(counts))))
    rewrites = draw(st.lists(st.integers(0, len(counts) - 1), max_size=2))
    n_rows = total_rows(plan_row_blocks(counts, rows_per_chunk))
    bound = max(n_rows, 1)
    reads = draw(
        st.lists(
            st.one_of(
                st.tuples(st.integers(0, bound), st.integers(0, bound)).map(lambda t: slice(min(t), max(t))),
                st.lists(st.integers(0, bound - 1), max_size=8).map(lambda r: np.array(r, dtype=np.int64)),
            ),
            min_size=1,
            max_size=4,
        )
    )
    return rows_per_chunk, counts, list(order) + rewrites, reads, draw(st.integers(0, 2**31))


@settings(max_examples=25, deadline=None)
@given(scenario())
def test_random_blocks_read_back_like_numpy(case):
    rows_per_chunk, counts, order, reads, seed = case
    rng = np.random.default_rng(seed)
    blocks = plan_row_blocks(counts, rows_per_chunk)
    n_rows = total_rows(blocks)
    url = f"memory://clipscope-hyp/{uuid.uuid4().hex}"
    store = RunStore.create(url, arrays=SPECS, n_rows=n_rows, rows_per_chunk=rows_per_chunk, attrs={})
    model = {s.name: np.zeros(s.shape(n_rows), s.dtype) for s in SPECS}
    model["valid"] = np.zeros(n_rows, bool)
    try:
        for index in order:
            block = blocks[index]
            if not block.capacity:
                continue
            data = {
                s.name: (rng.standard_normal((block.capacity, *s.shape_tail)) * 100).astype(s.dtype) for s in SPECS
            }
            valid = np.arange(block.capacity) < block.count
            store.write_rows(block.start, data, valid)
            for name, values in data.items():
                model[name][block.rows] = values
            model["valid"][block.rows] = valid
        reader = RunStore.open(url)
        for name, expected in model.items():
            np.testing.assert_array_equal(reader.read(name), expected)
            for rows in reads:
                if isinstance(rows, np.ndarray) and n_rows == 0:
                    continue
                np.testing.assert_array_equal(reader.read(name, rows), expected[rows])
    finally:
        fsspec.filesystem("memory").rm(url.split("://", 1)[1], recursive=True)
