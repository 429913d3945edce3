"""map_reduce / fan_out on an embedded 2-CPU Ray against the in-process reference and numpy."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from clipscope.cluster.reduce import fan_out, map_reduce, map_reduce_local, tree_combine
from clipscope.errors import ConfigError

N_BLOCKS = 11
BLOCK_ROWS = 50


def block_rows(block: int) -> np.ndarray:
    rng = np.random.default_rng(block)
    return rng.standard_normal((BLOCK_ROWS, 8)).astype(np.float32) * 10 ** rng.uniform(-3, 3)


def jittered(block: int) -> None:
    # Unseeded on purpose: completion order must not matter, so let it vary from run to run.
    time.sleep(random.uniform(0.0, 0.05))


def block_sum(block: int) -> np.ndarray:
    """float32 partial sums: their combination is order-sensitive at the bit level."""
    jittered(block)
    return block_rows(block).sum(axis=0, dtype=np.float32)


def add(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    return left + right


def block_label(block: int) -> tuple[int, ...]:
    jittered(block)
    return (block,)


def concat(left: tuple[int, ...], right: tuple[int, ...]) -> tuple[int, ...]:
    """Associative, not commutative: any reordering of partials would show."""
    return left + right


def slow_square(item: int) -> int:
    time.sleep(0.02 * (5 - item))
    return item * item


def explode(block: int) -> int:
    raise ValueError(f"bad block {block}")


def test_map_reduce_equals_local_reference_bit_for_bit_for_any_worker_count(ray_local):
    blocks = list(range(N_BLOCKS))
    local = map_reduce_local(blocks, block_sum, add, fanin=3)
    on_two_cpus = map_reduce(blocks, block_sum, add, fanin=3)
    one_at_a_time = map_reduce(blocks, block_sum, add, fanin=3, num_cpus_per_task=2)

    np.testing.assert_array_equal(on_two_cpus, local)
    np.testing.assert_array_equal(one_at_a_time, local)
    reference = np.concatenate([block_rows(block) for block in blocks]).astype(np.float64).sum(axis=0)
    np.testing.assert_allclose(local, reference, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("n_blocks, fanin", [(1, 4), (5, 2), (9, 4)])
def test_map_reduce_keeps_block_order_whatever_the_completion_order(ray_local, n_blocks, fanin):
    blocks = list(range(n_blocks))
    assert map_reduce(blocks, block_label, concat, fanin=fanin) == tuple(blocks)
    assert map_reduce_local(blocks, block_label, concat, fanin=fanin) == tuple(blocks)


def test_map_reduce_raises_the_map_error(ray_local):
    with pytest.raises(ValueError, match="bad block"):
        map_reduce([0, 1, 2], explode, add)


def test_fan_out_returns_results_in_item_order(ray_local):
    items = [0, 1, 2, 3, 4]
    assert fan_out(slow_square, items) == [0, 1, 4, 9, 16]
    assert fan_out(slow_square, []) == []


def test_tree_has_fixed_shape_over_block_order():
    shape = tree_combine(list(range(10)), tuple, fanin=4)
    assert shape == ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9))
    assert tree_combine(list(range(5)), tuple, fanin=2) == (((0, 1), (2, 3)), 4)
    assert tree_combine([7], tuple, fanin=3) == 7


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: map_reduce_local([1], block_sum, add, fanin=1), "fanin must be an integer ≥ 2, got 1"),
        (lambda: map_reduce_local([], block_sum, add), "blocks must hold at least one block, got none"),
        (lambda: map_reduce([1], block_sum, add, num_cpus_per_task=0), "num_cpus_per_task must be a number > 0"),
        (lambda: fan_out(slow_square, [1], num_cpus=-1), "num_cpus must be a number > 0, got -1"),
    ],
)
def test_bad_arguments_are_refused(call, message):
    with pytest.raises(ConfigError, match=message):
        call()
