"""Row-block planning, array specs and the dimension-name rule."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipscope.errors import ConfigError
from clipscope.storage.layout import (
    ArraySpec,
    check_dims_consistent,
    plan_row_blocks,
    row_slices,
    total_rows,
)


@settings(max_examples=200, deadline=None)
@given(
    counts=st.lists(st.integers(min_value=0, max_value=50), max_size=30),
    rows_per_chunk=st.integers(min_value=1, max_value=17),
)
def test_plan_row_blocks_invariants(counts, rows_per_chunk):
    blocks = plan_row_blocks(counts, rows_per_chunk)
    assert [b.index for b in blocks] == list(range(len(counts)))
    assert [b.count for b in blocks] == counts
    position = 0
    owner_of_chunk: dict[int, int] = {}
    for block in blocks:
        assert block.start == position  # contiguous, in shard order
        assert block.start % rows_per_chunk == 0  # aligned
        assert block.capacity % rows_per_chunk == 0
        assert block.count <= block.capacity < block.count + rows_per_chunk  # covers, minimal
        if block.count == 0:
            assert block.capacity == 0
        for row in range(block.start, block.stop):
            chunk = row // rows_per_chunk
            assert owner_of_chunk.setdefault(chunk, block.index) == block.index  # no shared chunk
        position = block.stop
    assert total_rows(blocks) == position == sum(b.capacity for b in blocks)


def test_plan_row_blocks_example_and_errors():
    blocks = plan_row_blocks([5, 0, 8, 1], 4)
    assert [(b.start, b.capacity, b.count) for b in blocks] == [(0, 8, 5), (8, 0, 0), (8, 8, 8), (16, 4, 1)]
    assert blocks[2].rows == slice(8, 16)
    with pytest.raises(ConfigError, match="rows_per_chunk must be an integer ≥ 1, got 0"):
        plan_row_blocks([1], 0)
    with pytest.raises(ConfigError, match="sample count of shard 1 must be an integer ≥ 0, got -2"):
        plan_row_blocks([1, -2], 4)
    with pytest.raises(ConfigError, match="got True"):
        plan_row_blocks([True], 4)


def test_row_slices_cover_rows():
    assert row_slices(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert row_slices(0, 4) == []


def test_array_spec_validation():
    spec = ArraySpec("direct/heads", ["sample", "layer", "head", "embed"], [2, 3, 4], "f4")
    assert spec.dims == ("sample", "layer", "head", "embed") and spec.dtype == "float32"
    assert spec.shape(8) == (8, 2, 3, 4)
    assert ArraySpec("d", ("a", "b"), (2, 3), "float32", per_sample=False).shape(8) == (2, 3)
    cases = [
        (("x", ("sample",), (2,), "float32"), "needs 2 dims for shape_tail \\(2,\\) plus the sample axis, got 1"),
        (("x", ("embed", "sample"), (2,), "float32"), "'sample' as first dim"),
        (("x", ("sample", "sample"), (2,), "float32"), "distinct"),
        (("x", ("sample", "embed"), (-1,), "float32"), "integers ≥ 0"),
        (("x", ("sample", "embed"), (2,), "U8"), "bool, integer, float or complex"),
        (("x", ("sample", "embed"), (2,), "nonsense"), "numpy dtype name"),
        (("valid", ("sample", "embed"), (2,), "float32"), "reserved"),
        (("manifest/x", ("sample", "embed"), (2,), "float32"), "reserved top-level name"),
        (("direct//heads", ("sample", "embed"), (2,), "float32"), "segments"),
        (("/direct", ("sample", "embed"), (2,), "float32"), "segments"),
    ]
    for args, message in cases:
        with pytest.raises(ConfigError, match=message):
            ArraySpec(*args)


def test_dims_consistent_within_group_and_ancestors_only():
    ok = [
        ("image_embedding", ("sample", "embed"), (8, 6)),
        ("direct/heads", ("sample", "layer", "head", "embed"), (8, 2, 3, 6)),
        ("second_order/layer_0/weights", ("sample", "later_layer"), (8, 1)),
        ("second_order/layer_1/weights", ("sample", "later_layer"), (8, 0)),  # siblings may differ
    ]
    check_dims_consistent(ok)
    with pytest.raises(ConfigError, match="'layer' has length 2 in 'direct/heads' but 1 in 'direct/tokens'"):
        check_dims_consistent(ok + [("direct/tokens", ("sample", "layer"), (8, 1))])
    with pytest.raises(ConfigError, match="'embed' has length 6 in 'image_embedding' but 7"):
        check_dims_consistent(ok + [("reductions/deep/x", ("embed",), (7,))])
