"""Where a job's work runs: one interface, two implementations. Jobs receive an ``Executor`` and never
know whether Ray is there.

- ``LocalExecutor``: everything in this process.
- ``RayExecutor``: Ray tasks on whatever Ray ``ray_runtime`` connected to (an embedded local instance or
  an existing cluster of any size).

Both offer the same operations:

- ``map_reduce(blocks, map_fn, combine_fn)``: ``map_fn`` over every block, then ``combine_fn`` over the
  partials in a tree fixed by block order (``reduce.TreeBuilder``), so the result is the same — bit for
  bit — for any number of workers, any scheduling, and locally or on Ray;
- ``fan_out(fn, items)``: ``fn`` over independent items, results in item order;
- progress: each call takes a description and a unit (and optionally the size of each block or item in
  that unit, e.g. images per row block); a bar on stderr moves per finished block or item with its rate
  (img/s, items/s) and ETA when stderr is a terminal; otherwise nothing is drawn and one summary line is
  logged at the end (plus one every ``log_interval_s`` for long runs) — see ``progress.Progress``.

``open_executor(workers, address)`` picks one: neither (and no ``RAY_ADDRESS``) → ``LocalExecutor``;
``workers=N`` → an embedded local Ray with N CPUs; ``address`` (``auto``, ``HOST:PORT``,
``ray://HOST:10001``) or ``RAY_ADDRESS`` (what ``ray job submit`` sets for its entrypoint) → join that
cluster, where ``workers=N`` bounds the tasks (extraction: actors) running at once. Functions, blocks
and items are pickled to Ray workers: use module-level functions or picklable callables.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, TypeVar

from clipscope.cluster.progress import Progress
from clipscope.cluster.reduce import fan_out, fan_out_local, map_reduce, map_reduce_local
from clipscope.cluster.runtime import RayRuntime, check_address, cluster_nodes, ray_runtime
from clipscope.errors import ConfigError

B = TypeVar("B")
S = TypeVar("S")
V = TypeVar("V")

PROGRESS_DISPLAYS = ("auto", "bar", "log", "off")


def _check_workers(value: Any, name: str = "workers") -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be an integer ≥ 1, got {value!r}")
    return value


def _sizes(sizes: Sequence[int] | None, n: int, what: str) -> list[int]:
    if sizes is None:
        return [1] * n
    values = list(sizes)
    if len(values) != n or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise ConfigError(f"sizes must hold one integer ≥ 0 per {what} ({n}), got {values!r}")
    return values


class Executor(ABC):
    """Runs a job's reductions and independent tasks; see the module docstring.

    progress: "auto" (a bar when stderr is a terminal, else a final summary line), "bar", "log" or
    "off". stream (the bar's, default stderr) and log_interval_s are passed to ``Progress``.
    """

    kind: str = "?"

    def __init__(self, *, progress: str = "auto", stream: IO[str] | None = None, log_interval_s: float = 30.0):
        if progress not in PROGRESS_DISPLAYS:
            raise ConfigError(f"progress must be one of {', '.join(PROGRESS_DISPLAYS)}, got {progress!r}")
        self.progress_display = progress
        self._stream = stream
        self._log_interval_s = log_interval_s

    @property
    def is_ray(self) -> bool:
        return self.kind == "ray"

    def progress(self, desc: str, unit: str) -> Progress:
        """A progress display of this executor's kind (for work a job drives itself)."""
        return Progress(desc, unit=unit, display=self.progress_display, stream=self._stream,
                        log_interval_s=self._log_interval_s)

    @contextlib.contextmanager
    def _tracked(self, desc: str, unit: str, sizes: list[int]) -> Iterator[Callable[[int], None]]:
        progress = self.progress(desc, unit)
        progress.start(sum(sizes), len(sizes))
        try:
            yield lambda index: progress.advance(sizes[index])
        finally:
            progress.close()

    def map_reduce(self, blocks: Sequence[B], map_fn: Callable[[B], S], combine_fn: Callable[[S, S], S], *,
                   desc: str = "reduce", unit: str = "blocks", sizes: Sequence[int] | None = None,
                   fanin: int = 4) -> S:
        """``map_fn`` over every block, ``combine_fn`` (associative) over the partials in the fixed tree.

        ``sizes``: each block's size in ``unit`` for the progress display (default 1 per block).
        """
        items = list(blocks)
        with self._tracked(desc, unit, _sizes(sizes, len(items), "block")) as on_done:
            return self._map_reduce(items, map_fn, combine_fn, fanin, on_done)

    def fan_out(self, fn: Callable[[V], S], items: Sequence[V], *, desc: str = "tasks", unit: str = "items",
                sizes: Sequence[int] | None = None) -> list[S]:
        """``[fn(item) for item in items]``, in item order; ``sizes`` as in ``map_reduce``."""
        work = list(items)
        if not work:
            return []
        with self._tracked(desc, unit, _sizes(sizes, len(work), "item")) as on_done:
            return self._fan_out(fn, work, on_done)

    @abstractmethod
    def _map_reduce(self, blocks: list, map_fn, combine_fn, fanin: int, on_done: Callable[[int], None]) -> Any:
        ...

    @abstractmethod
    def _fan_out(self, fn, items: list, on_done: Callable[[int], None]) -> list:
        ...

    @abstractmethod
    def describe(self) -> str:
        """One line for logs: where the work runs."""


class LocalExecutor(Executor):
    """Everything in this process, one block or item after the other."""

    kind = "local"

    def _map_reduce(self, blocks, map_fn, combine_fn, fanin, on_done):
        return map_reduce_local(blocks, map_fn, combine_fn, fanin=fanin, on_done=on_done)

    def _fan_out(self, fn, items, on_done):
        return fan_out_local(fn, items, on_done=on_done)

    def describe(self) -> str:
        return "in this process"


class RayExecutor(Executor):
    """Ray tasks on the Ray this process is connected to (``ray_runtime``); Ray must be running.

    runtime: what ``ray_runtime`` connected to (for ``describe``). cpus_per_task: CPUs each task
    reserves. max_in_flight: at most this many map tasks or fan-out items unfinished at a time (None:
    all submitted at once). workers: the ``workers`` the executor was opened with (None: Ray's size).
    """

    kind = "ray"

    def __init__(self, runtime: RayRuntime | None = None, *, cpus_per_task: float = 1,
                 max_in_flight: int | None = None, workers: int | None = None, **progress: Any):
        super().__init__(**progress)
        if isinstance(cpus_per_task, bool) or not isinstance(cpus_per_task, (int, float)) or cpus_per_task <= 0:
            raise ConfigError(f"cpus_per_task must be a number > 0, got {cpus_per_task!r}")
        self.runtime = runtime
        self.cpus_per_task = cpus_per_task
        self.max_in_flight = _check_workers(max_in_flight, "max_in_flight")
        self.workers = _check_workers(workers)

    def _map_reduce(self, blocks, map_fn, combine_fn, fanin, on_done):
        return map_reduce(blocks, map_fn, combine_fn, fanin=fanin, num_cpus_per_task=self.cpus_per_task,
                          max_in_flight=self.max_in_flight, on_done=on_done)

    def _fan_out(self, fn, items, on_done):
        return fan_out(fn, items, num_cpus=self.cpus_per_task, max_in_flight=self.max_in_flight, on_done=on_done)

    def node_count(self) -> int:
        return len(cluster_nodes())

    def describe(self) -> str:
        from clipscope.cluster.runtime import describe_cluster

        mode = self.runtime.mode if self.runtime is not None else "reused"
        if mode == "cluster":
            where = f"on the Ray cluster at {self.runtime.address}"
        else:
            where = "on an embedded local Ray" if mode == "embedded" else "on the Ray of this process"
        return f"{where} ({describe_cluster()})"


def resolve_address(address: str | None) -> str | None:
    """The cluster to join: ``address``, else ``RAY_ADDRESS``, else None (validated either way)."""
    if address is not None:
        return check_address(address, "address")
    env = os.environ.get("RAY_ADDRESS", "").strip()
    return check_address(env, "RAY_ADDRESS") if env else None


@contextlib.contextmanager
def open_executor(workers: int | None = None, address: str | None = None, *, progress: str = "auto",
                  object_store_memory: int | None = None, quiet: bool = True) -> Iterator[Executor]:
    """The executor for ``workers`` / ``address`` (see the module docstring); Ray stops or disconnects
    on exit when this context started or joined it.

    An unreachable or malformed address raises ConfigError (one line naming it) before any work.
    object_store_memory sizes an embedded Ray only.
    """
    workers = _check_workers(workers)
    target = resolve_address(address)
    if target is None and workers is None:
        yield LocalExecutor(progress=progress)
        return
    if target is None:
        with ray_runtime(num_cpus=workers, object_store_memory=object_store_memory, quiet=quiet) as runtime:
            # Ray runs at most `workers` tasks at once; twice that keeps its queue fed.
            yield RayExecutor(runtime, workers=workers, max_in_flight=2 * workers, progress=progress)
        return
    with ray_runtime(target, quiet=quiet) as runtime:
        if workers is None:
            cpus = sum(node.num_cpus for node in cluster_nodes())
            in_flight = max(2, 2 * int(cpus))
        else:
            in_flight = workers
        yield RayExecutor(runtime, workers=workers, max_in_flight=in_flight, progress=progress)
