"""Reductions over row blocks: map every block as a Ray task, then combine the partials in a fixed tree.

The tree is built over the block order (groups of ``fanin`` neighbours, level by level), never over
completion order, so a reduction gives the same value — bit for bit, floating point included — for any
number of workers and any scheduling; ``map_reduce_local`` walks the very same tree in this process,
which makes it the reference for tests and the fast path for tiny inputs. ``combine_fn`` must be
associative; it need not be commutative.

The whole task graph is submitted at once and Ray runs a combine as soon as its inputs exist; partial
results travel through the object store, so they should be summaries (sums, moments, top-k), not rows.
Functions and blocks are pickled to the workers: use module-level functions or picklable callables.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from clipscope.errors import ConfigError

B = TypeVar("B")
S = TypeVar("S")
V = TypeVar("V")

_REMOTE: dict[str, Any] = {}


def _apply(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


def _combine_in_order(combine_fn: Callable[[Any, Any], Any], *parts: Any) -> Any:
    return functools.reduce(combine_fn, parts)


def _remote(name: str) -> Any:
    """The Ray remote version of ``_apply`` / ``_combine_in_order``, made once per process."""
    if name not in _REMOTE:
        import ray

        _REMOTE[name] = ray.remote({"apply": _apply, "combine": _combine_in_order}[name])
    return _REMOTE[name]


def _check_fanin(fanin: Any) -> int:
    if isinstance(fanin, bool) or not isinstance(fanin, int) or fanin < 2:
        raise ConfigError(f"fanin must be an integer ≥ 2, got {fanin!r}")
    return fanin


def _check_cpus(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{name} must be a number > 0, got {value!r}")
    return value


def _check_blocks(blocks: Sequence[Any]) -> list[Any]:
    items = list(blocks)
    if not items:
        raise ConfigError("blocks must hold at least one block, got none")
    return items


def tree_combine(values: Sequence[V], combine_group: Callable[[list[V]], V], fanin: int) -> V:
    """Reduce ``values`` level by level, joining runs of ``fanin`` neighbours with ``combine_group``.

    A run of one value passes up unchanged. The shape depends only on len(values) and fanin.
    """
    fanin = _check_fanin(fanin)
    level = list(values)
    if not level:
        raise ConfigError("tree_combine needs at least one value, got none")
    while len(level) > 1:
        groups = [level[start : start + fanin] for start in range(0, len(level), fanin)]
        level = [group[0] if len(group) == 1 else combine_group(group) for group in groups]
    return level[0]


def map_reduce_local(
    blocks: Sequence[B],
    map_fn: Callable[[B], S],
    combine_fn: Callable[[S, S], S],
    *,
    fanin: int = 4,
) -> S:
    """``map_reduce`` in this process, same tree, same result."""
    fanin = _check_fanin(fanin)
    partials = [map_fn(block) for block in _check_blocks(blocks)]
    return tree_combine(partials, lambda group: functools.reduce(combine_fn, group), fanin)


def map_reduce(
    blocks: Sequence[B],
    map_fn: Callable[[B], S],
    combine_fn: Callable[[S, S], S],
    *,
    fanin: int = 4,
    num_cpus_per_task: float = 1,
) -> S:
    """map_fn over every block as Ray tasks, combine_fn over the partials in the fixed tree; the result.

    Needs Ray running (``ray_runtime``). Each map or combine task reserves ``num_cpus_per_task`` CPUs.
    An exception in map_fn or combine_fn is raised here (as Ray's wrapper of the original type).
    """
    fanin = _check_fanin(fanin)
    num_cpus = _check_cpus("num_cpus_per_task", num_cpus_per_task)
    items = _check_blocks(blocks)
    import ray

    if not ray.is_initialized():
        raise ConfigError("map_reduce needs a running Ray; call it inside `with ray_runtime(...)`")
    apply = _remote("apply").options(num_cpus=num_cpus)
    combine = _remote("combine").options(num_cpus=num_cpus)
    map_ref = ray.put(map_fn)
    combine_ref = ray.put(combine_fn)
    root = tree_combine(
        [apply.remote(map_ref, block) for block in items],
        lambda group: combine.remote(combine_ref, *group),
        fanin,
    )
    return ray.get(root)


def fan_out(fn: Callable[[V], S], items: Sequence[V], *, num_cpus: float = 1) -> list[S]:
    """``[fn(item) for item in items]`` as one Ray task per item; results in item order."""
    num_cpus = _check_cpus("num_cpus", num_cpus)
    work = list(items)
    if not work:
        return []
    import ray

    if not ray.is_initialized():
        raise ConfigError("fan_out needs a running Ray; call it inside `with ray_runtime(...)`")
    apply = _remote("apply").options(num_cpus=num_cpus)
    fn_ref = ray.put(fn)
    return ray.get([apply.remote(fn_ref, item) for item in work])
