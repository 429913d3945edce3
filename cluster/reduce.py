"""Reductions over row blocks: map every block as a Ray task, then combine the partials in a fixed tree.

The tree is built over the block order (groups of ``fanin`` neighbours, level by level), never over
completion order, so a reduction gives the same value — bit for bit, floating point included — for any
number of workers and any scheduling; ``map_reduce_local`` walks the very same tree in this process,
which makes it the reference for tests and the fast path for tiny inputs. ``combine_fn`` must be
associative; it need not be commutative.

Map tasks are submitted in block order (at most ``max_in_flight`` unfinished at a time when given) and
each group of ``fanin`` neighbours is combined as soon as its last member has been submitted
(``TreeBuilder``, the same tree as ``tree_combine``), so Ray runs a combine as soon as its inputs
exist and the driver holds no partial it no longer needs. Partial results travel through the object
store, so they should be summaries (sums, moments, top-k), not rows. Functions and blocks are pickled
to the workers: use module-level functions or picklable callables. ``on_done(index)`` is called in
this process once per finished map task or fan-out item (in completion order), for progress.
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


class TreeBuilder:
    """``tree_combine`` fed one value at a time: a group is combined as soon as it is complete.

    ``push`` the values in order, then ``finish()`` for the root. The groups, their order and so the
    result are exactly those of ``tree_combine`` over the same values; only the moment each group is
    combined differs (as early as possible, so finished partials need not be kept).
    """

    def __init__(self, combine_group: Callable[[list[V]], V], fanin: int):
        self._fanin = _check_fanin(fanin)
        self._combine_group = combine_group
        self._levels: list[list[V]] = []

    def push(self, value: V, level: int = 0) -> None:
        while len(self._levels) <= level:
            self._levels.append([])
        pending = self._levels[level]
        pending.append(value)
        if len(pending) == self._fanin:
            self._levels[level] = []
            self.push(self._combine_group(pending), level + 1)

    def finish(self) -> V:
        """The root. The last, incomplete group of each level is combined (or passed up alone)."""
        if not any(self._levels):
            raise ConfigError("tree_combine needs at least one value, got none")
        level = 0
        while True:
            pending = self._levels[level]
            higher = any(self._levels[level + 1:])
            if not higher and len(pending) == 1:
                return pending[0]
            self._levels[level] = []
            if pending:
                self.push(pending[0] if len(pending) == 1 else self._combine_group(pending), level + 1)
            level += 1


def map_reduce_local(
    blocks: Sequence[B],
    map_fn: Callable[[B], S],
    combine_fn: Callable[[S, S], S],
    *,
    fanin: int = 4,
    on_done: Callable[[int], None] | None = None,
) -> S:
    """``map_reduce`` in this process, same tree, same result."""
    fanin = _check_fanin(fanin)
    tree = TreeBuilder(lambda group: functools.reduce(combine_fn, group), fanin)
    for index, block in enumerate(_check_blocks(blocks)):
        tree.push(map_fn(block))
        if on_done is not None:
            on_done(index)
    return tree.finish()


def fan_out_local(fn: Callable[[V], S], items: Sequence[V], *,
                  on_done: Callable[[int], None] | None = None) -> list[S]:
    """``fan_out`` in this process: ``[fn(item) for item in items]``."""
    results = []
    for index, item in enumerate(items):
        results.append(fn(item))
        if on_done is not None:
            on_done(index)
    return results


def _check_in_flight(value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"max_in_flight must be an integer ≥ 1 or None, got {value!r}")
    return value


class _Waiter:
    """Ray object refs of submitted tasks, by index; reports each finished one through ``on_done``."""

    def __init__(self, ray: Any, on_done: Callable[[int], None] | None):
        self._ray = ray
        self._on_done = on_done
        self._index: dict[Any, int] = {}

    def __len__(self) -> int:
        return len(self._index)

    def add(self, ref: Any, index: int) -> None:
        self._index[ref] = index

    def wait(self, down_to: int) -> None:
        """Block until at most ``down_to`` tracked tasks are unfinished."""
        while len(self._index) > down_to:
            # fetch_local=False: the partials stay in the object store, where the combines read them
            done, _ = self._ray.wait(list(self._index), num_returns=1, fetch_local=False)
            for ref in done:
                index = self._index.pop(ref)
                if self._on_done is not None:
                    self._on_done(index)


def map_reduce(
    blocks: Sequence[B],
    map_fn: Callable[[B], S],
    combine_fn: Callable[[S, S], S],
    *,
    fanin: int = 4,
    num_cpus_per_task: float = 1,
    max_in_flight: int | None = None,
    on_done: Callable[[int], None] | None = None,
) -> S:
    """map_fn over every block as Ray tasks, combine_fn over the partials in the fixed tree; the result.

    Needs Ray running (``ray_runtime``). Each map or combine task reserves ``num_cpus_per_task`` CPUs;
    ``max_in_flight`` bounds the unfinished map tasks (None: all at once). An exception in map_fn or
    combine_fn is raised here (as Ray's wrapper of the original type).
    """
    fanin = _check_fanin(fanin)
    num_cpus = _check_cpus("num_cpus_per_task", num_cpus_per_task)
    max_in_flight = _check_in_flight(max_in_flight)
    items = _check_blocks(blocks)
    import ray

    if not ray.is_initialized():
        raise ConfigError("map_reduce needs a running Ray; call it inside `with ray_runtime(...)`")
    apply = _remote("apply").options(num_cpus=num_cpus)
    combine = _remote("combine").options(num_cpus=num_cpus)
    map_ref = ray.put(map_fn)
    combine_ref = ray.put(combine_fn)
    tree = TreeBuilder(lambda group: combine.remote(combine_ref, *group), fanin)
    waiter = _Waiter(ray, on_done)
    for index, block in enumerate(items):
        if max_in_flight is not None:
            waiter.wait(max_in_flight - 1)
        ref = apply.remote(map_ref, block)
        waiter.add(ref, index)
        tree.push(ref)
        del ref
    root = tree.finish()
    waiter.wait(0)
    return ray.get(root)


def fan_out(fn: Callable[[V], S], items: Sequence[V], *, num_cpus: float = 1, max_in_flight: int | None = None,
            on_done: Callable[[int], None] | None = None) -> list[S]:
    """``[fn(item) for item in items]`` as one Ray task per item; results in item order."""
    num_cpus = _check_cpus("num_cpus", num_cpus)
    max_in_flight = _check_in_flight(max_in_flight)
    work = list(items)
    if not work:
        return []
    import ray

    if not ray.is_initialized():
        raise ConfigError("fan_out needs a running Ray; call it inside `with ray_runtime(...)`")
    apply = _remote("apply").options(num_cpus=num_cpus)
    fn_ref = ray.put(fn)
    waiter = _Waiter(ray, on_done)
    refs = []
    for index, item in enumerate(work):
        if max_in_flight is not None:
            waiter.wait(max_in_flight - 1)
        refs.append(apply.remote(fn_ref, item))
        waiter.add(refs[-1], index)
    waiter.wait(0)
    return ray.get(refs)
