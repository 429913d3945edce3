"""A pool of Ray actors that processes tasks (shards) one at a time each, with retries.

One actor per GPU (``use_gpu``) or ``num_workers`` CPU actors; each actor calls ``worker_factory()``
once (the model loads once per actor) and then ``worker.process(task)`` for every task it is handed.
The worker writes its big outputs into the store itself; only the small result (counts, timings)
travels back to the driver, where ``on_result(task, result)`` runs exactly once per finished task.

Tasks are handed out dynamically: every ready actor holds at most ``max_in_flight_per_worker`` tasks
(the second one hides the round trip), so fast actors take more tasks and a lost actor strands at
most that many. Failure handling:

- ``process`` raises: that task used one attempt and goes back in the queue;
- an actor dies (process killed, node removed, out of memory): its tasks go back to the front of the
  queue and a replacement actor is started (at most ``max_replacements`` over the run). Which of its
  tasks was running is not knowable (a finished task's reply can die with the process), so each of
  them reruns alone on an idle actor; a task that was alone on a dead actor used one attempt, which
  bounds a task that kills every actor it runs on;
- a task that has used ``max_attempts`` is reported through ``on_failure(task, last_error)`` and the
  run goes on with the rest;
- an error that says retrying cannot help (``retryable = False`` on its class, e.g. a shard whose
  bytes are not a tar) fails the task at once; an `EnvironmentFault` (disk full, read-only store)
  stops the whole run, since every other task would hit it too.

The same policy (``MAX_ATTEMPTS``, `retry_decision`) serves tasks run in-process, without Ray.

A task may therefore run more than once, possibly after a partial write; workers must write
idempotently (same task → same rows), which the store's row ownership guarantees.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from clipscope.cluster.progress import Progress
from clipscope.errors import ClipscopeError, ConfigError, EnvironmentFault

logger = logging.getLogger(__name__)

_ERROR_TEXT_LIMIT = 500
# Attempts per task, on Ray and in-process alike.
MAX_ATTEMPTS = 3


def retry_decision(err: BaseException) -> str:
    """What a task's exception means: ``"abort"`` the run, ``"fail"`` the task now, or ``"retry"``."""
    if isinstance(err, EnvironmentFault):
        return "abort"
    if getattr(err, "retryable", True) is False:
        return "fail"
    return "retry"
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class Worker(Protocol):
    """What ``worker_factory()`` returns: lives inside one actor and processes one task at a time."""

    def process(self, task: Any) -> Any: ...


class WorkerStartupError(ClipscopeError):
    """No pool actor could be started (the worker factory failed in every one, or none was scheduled)."""


@dataclass(frozen=True)
class PoolSummary:
    """How a ``run_shards`` call went.

    done / failed: tasks finished / given up after max_attempts; retried: task re-submissions;
    items: items reported by finished tasks; actors_started / actors_lost: pool actors over the run.
    """

    done: int
    failed: int
    retried: int
    elapsed_s: float
    items: int
    actors_started: int
    actors_lost: int


class _PoolActor:
    """The Ray actor body: builds the worker once, then forwards tasks to it."""

    def __init__(self, worker_factory: Callable[[], Worker]):
        self._worker = worker_factory()

    def describe(self) -> dict[str, Any]:
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
        }

    def process(self, task: Any) -> Any:
        return self._worker.process(task)


@dataclass(eq=False)
class _Slot:
    """Driver-side view of one actor: its handle, readiness and the tasks it holds, oldest first."""

    number: int
    handle: Any
    probe: Any
    ready: bool = False
    where: str = "?"
    in_flight: deque[tuple[int, Any]] = field(default_factory=deque)


def _default_weight(task: Any) -> Any:
    if isinstance(task, Mapping):
        return task.get("weight", 1)
    return getattr(task, "weight", 1)


def _default_count(result: Any) -> Any:
    if isinstance(result, Mapping):
        return result.get("count")
    return getattr(result, "count", None)


def _as_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be an integer ≥ 0, got {value!r}")
    return value


def _short(text: str) -> str:
    flat = " ".join(_ANSI_ESCAPE.sub("", text).split())
    return flat if len(flat) <= _ERROR_TEXT_LIMIT else flat[: _ERROR_TEXT_LIMIT - 1] + "…"


def _task_error_text(err: Exception) -> str:
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        return _short(f"{type(cause).__name__}: {cause}")
    return _short(f"{type(err).__name__}: {err}")


def _actor_error_text(err: Exception) -> str:
    if getattr(err, "actor_init_failed", False):
        # The message embeds the factory's traceback; its last line is the exception itself.
        lines = [line.strip() for line in _ANSI_ESCAPE.sub("", str(err)).splitlines() if line.strip()]
        return _short(f"worker factory failed in the actor: {lines[-1] if lines else err}")
    return _short(f"worker actor lost ({type(err).__name__}): {err}")


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer ≥ 1, got {value!r}")
    return value


class _ShardPool:
    def __init__(
        self,
        ray: Any,
        tasks: list[Any],
        weights: list[int],
        worker_factory: Callable[[], Worker],
        *,
        num_workers: int,
        use_gpu: bool,
        cpus_per_worker: float,
        max_attempts: int,
        max_in_flight: int,
        max_replacements: int,
        on_result: Callable[[Any, Any], None],
        on_failure: Callable[[Any, str], None],
        count_of: Callable[[Any], Any],
        progress: Progress | None,
        startup_timeout_s: float,
        poll_s: float,
    ):
        self.ray = ray
        # One copy in the object store; every actor (replacements too) is built from it.
        self.factory_ref = ray.put(worker_factory)
        self.tasks = tasks
        self.weights = weights
        self.num_workers = num_workers
        self.max_attempts = max_attempts
        self.max_in_flight = max_in_flight
        self.replacements_left = max_replacements
        self.on_result = on_result
        self.on_failure = on_failure
        self.count_of = count_of
        self.progress = progress
        self.startup_timeout_s = startup_timeout_s
        self.poll_s = poll_s
        self.actor_class = ray.remote(_PoolActor).options(
            num_cpus=cpus_per_worker,
            num_gpus=1 if use_gpu else 0,
            max_restarts=0,
            max_task_retries=0,
            scheduling_strategy="SPREAD",
        )
        self.pending: deque[int] = deque(range(len(tasks)))
        self.attempts = [0] * len(tasks)
        self.slots: list[_Slot] = []
        # Tasks that were on an actor when it died: they run alone until they finish or fail.
        self.suspects: set[int] = set()
        self.owners: dict[Any, tuple[_Slot, int | None]] = {}
        self.in_flight_total = 0
        self.done = 0
        self.failed = 0
        self.retried = 0
        self.items = 0
        self.actors_started = 0
        self.actors_lost = 0
        self.ever_ready = False
        self.init_failures = 0
        self.last_actor_error = ""
        self.last_event_at = time.monotonic()

    # -- actors -------------------------------------------------------------------------------
    def start_actor(self) -> None:
        handle = self.actor_class.remote(self.factory_ref)
        probe = handle.describe.remote()
        slot = _Slot(number=self.actors_started, handle=handle, probe=probe)
        self.actors_started += 1
        self.slots.append(slot)
        self.owners[probe] = (slot, None)

    def kill(self, slot: _Slot) -> None:
        try:
            self.ray.kill(slot.handle, no_restart=True)
        except Exception as err:  # an actor that is already gone cannot be killed; nothing to do
            logger.debug("ray.kill of pool actor %d: %s", slot.number, err)

    def lose(self, slot: _Slot, err: Exception) -> None:
        """The actor behind ``slot`` is gone: settle or requeue its tasks, then start a replacement."""
        if slot not in self.slots:
            return
        self.slots.remove(slot)
        self.owners.pop(slot.probe, None)
        self.actors_lost += 1
        message = _actor_error_text(err)
        self.last_actor_error = message
        logger.warning("pool actor %d on %s lost: %s", slot.number, slot.where, message)
        self.kill(slot)
        entries = list(slot.in_flight)
        slot.in_flight.clear()
        for _, ref in entries:
            self.owners.pop(ref, None)
        self.in_flight_total -= len(entries)
        # Results that reached the driver before the actor died still count as finished.
        stranded = []
        for index, ref in entries:
            finished, _ = self.ray.wait([ref], timeout=0)
            if finished:
                try:
                    result = self.ray.get(ref)
                except self.ray.exceptions.RayError:
                    stranded.append(index)
                else:
                    self.complete(index, result)
                    continue
            else:
                stranded.append(index)
        if len(stranded) == 1:
            # It was alone on the actor: it used an attempt (whatever killed the actor).
            self.suspects.add(stranded[0])
            self.attempt_failed(stranded[0], message, front=True)
        else:
            # Which of several tasks was running is unknown: a finished task's reply can be lost
            # with the process. None is charged; each reruns alone, so a task that kills its actor
            # is caught alone and charged then.
            for index in reversed(stranded):
                self.suspects.add(index)
                self.requeue(index, front=True)
        if not slot.ready:
            self.init_failures += 1
        if self.replacements_left > 0:
            self.replacements_left -= 1
            self.start_actor()

    # -- tasks --------------------------------------------------------------------------------
    def requeue(self, index: int, *, front: bool) -> None:
        self.retried += 1
        if self.progress is not None:
            self.progress.retry()
        if front:
            self.pending.appendleft(index)
        else:
            self.pending.append(index)

    def attempt_failed(self, index: int, message: str, *, front: bool) -> None:
        self.attempts[index] += 1
        if self.attempts[index] >= self.max_attempts:
            self.give_up(index, f"failed after {self.attempts[index]} attempt(s); last error: {message}")
        else:
            logger.warning(
                "task %d attempt %d/%d failed: %s", index, self.attempts[index], self.max_attempts, message
            )
            self.requeue(index, front=front)

    def give_up(self, index: int, message: str) -> None:
        self.failed += 1
        self.suspects.discard(index)
        logger.warning("task %d %s", index, message)
        if self.progress is not None:
            self.progress.fail(expected=self.weights[index])
        self.on_failure(self.tasks[index], message)

    def complete(self, index: int, result: Any) -> None:
        self.suspects.discard(index)
        count = self.count_of(result)
        items = self.weights[index] if count is None else _as_count("result count", count)
        self.done += 1
        self.items += items
        self.last_event_at = time.monotonic()
        if self.progress is not None:
            self.progress.advance(items, expected=self.weights[index])
        self.on_result(self.tasks[index], result)

    def dispatch(self) -> None:
        """Fill ready actors breadth first; a suspect task runs alone on an otherwise idle actor."""
        ready = [slot for slot in self.slots if slot.ready]
        for depth in range(1, self.max_in_flight + 1):
            for slot in ready:
                if not self.pending:
                    return
                if len(slot.in_flight) >= depth:
                    continue
                if slot.in_flight and (
                    self.pending[0] in self.suspects
                    or any(index in self.suspects for index, _ in slot.in_flight)
                ):
                    continue
                index = self.pending.popleft()
                ref = slot.handle.process.remote(self.tasks[index])
                slot.in_flight.append((index, ref))
                self.owners[ref] = (slot, index)
                self.in_flight_total += 1

    # -- main loop ----------------------------------------------------------------------------
    def handle(self, ref: Any) -> None:
        owner = self.owners.pop(ref, None)
        if owner is None:
            return
        slot, index = owner
        exceptions = self.ray.exceptions
        if index is None:
            try:
                info = self.ray.get(ref)
            except exceptions.RayError as err:
                self.lose(slot, err)
                return
            slot.ready = True
            slot.where = f"{info['hostname']} pid {info['pid']}"
            self.ever_ready = True
            self.last_event_at = time.monotonic()
            return
        try:
            result = self.ray.get(ref)
        except exceptions.RayTaskError as err:
            slot.in_flight.remove((index, ref))
            self.in_flight_total -= 1
            self.suspects.discard(index)  # it raised and its actor lived: not an actor killer
            cause = getattr(err, "cause", None)
            decision = retry_decision(cause) if isinstance(cause, BaseException) else "retry"
            if decision == "abort":
                raise cause
            if decision == "fail":
                self.attempts[index] = self.max_attempts
                self.give_up(index, _short(str(cause)))
                return
            self.attempt_failed(index, _task_error_text(err), front=False)
            return
        except exceptions.RayError as err:
            self.lose(slot, err)
            return
        slot.in_flight.remove((index, ref))
        self.in_flight_total -= 1
        self.complete(index, result)

    def abandon_pending(self) -> None:
        reason = (
            f"no worker actors left (replacement budget spent); last actor error: {self.last_actor_error}"
        )
        while self.pending:
            self.give_up(self.pending.popleft(), reason)

    def run(self) -> None:
        for _ in range(self.num_workers):
            self.start_actor()
        while self.pending or self.in_flight_total:
            if not self.ever_ready and self.init_failures >= self.num_workers:
                raise WorkerStartupError(
                    f"the worker factory failed in all {self.init_failures} pool actors started; "
                    f"last error: {self.last_actor_error}"
                )
            if not self.slots:
                self.abandon_pending()
                break
            self.dispatch()
            finished, _ = self.ray.wait(list(self.owners), num_returns=1, timeout=self.poll_s)
            for ref in finished:
                self.handle(ref)
            if self.progress is not None:
                self.progress.tick()
            self.check_startup_timeout()

    def check_startup_timeout(self) -> None:
        if not self.pending or any(slot.ready for slot in self.slots):
            return
        waited = time.monotonic() - self.last_event_at
        if waited > self.startup_timeout_s:
            raise WorkerStartupError(
                f"no pool actor became ready within {self.startup_timeout_s:g}s while {len(self.pending)} "
                f"task(s) wait; cluster resources: {self.ray.cluster_resources()}"
            )

    def shutdown(self) -> None:
        for slot in self.slots:
            self.kill(slot)
        self.slots.clear()
        self.owners.clear()


def run_shards(
    tasks: Sequence[Any],
    worker_factory: Callable[[], Worker],
    *,
    num_workers: int | None = None,
    use_gpu: bool = False,
    max_attempts: int = MAX_ATTEMPTS,
    on_result: Callable[[Any, Any], None],
    on_failure: Callable[[Any, str], None],
    progress: Progress | None = None,
    cpus_per_worker: float = 1,
    max_in_flight_per_worker: int = 2,
    max_replacements: int | None = None,
    weight_of: Callable[[Any], int] | None = None,
    count_of: Callable[[Any], int | None] | None = None,
    startup_timeout_s: float = 900.0,
    poll_s: float = 1.0,
) -> PoolSummary:
    """Process every task on a pool of Ray actors; see the module docstring for the guarantees.

    num_workers: actors to start (default: one per GPU with use_gpu, else one per ``cpus_per_worker``
    CPUs of the cluster; never more than there are tasks). weight_of(task): expected items of a task
    (default ``task.weight`` / ``task["weight"]``, else 1); count_of(result): items it produced
    (default ``result.count`` / ``result["count"]``, else its weight). max_replacements: actors
    started to replace lost ones over the run (default num_workers × max_attempts).
    ``progress`` is started and closed here. Needs Ray running (``ray_runtime``).
    """
    max_attempts = _check_positive_int("max_attempts", max_attempts)
    max_in_flight = _check_positive_int("max_in_flight_per_worker", max_in_flight_per_worker)
    if num_workers is not None:
        _check_positive_int("num_workers", num_workers)
    if max_replacements is not None and (
        isinstance(max_replacements, bool) or not isinstance(max_replacements, int) or max_replacements < 0
    ):
        raise ConfigError(f"max_replacements must be an integer ≥ 0 or None, got {max_replacements!r}")
    if not isinstance(cpus_per_worker, (int, float)) or isinstance(cpus_per_worker, bool) or cpus_per_worker < 0:
        raise ConfigError(f"cpus_per_worker must be a number ≥ 0, got {cpus_per_worker!r}")
    for name, value in (("startup_timeout_s", startup_timeout_s), ("poll_s", poll_s)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{name} must be a number > 0, got {value!r}")
    if not callable(worker_factory):
        raise ConfigError(f"worker_factory must be callable, got {type(worker_factory).__name__}")
    task_list = list(tasks)
    weigh = weight_of if weight_of is not None else _default_weight
    weights = [_as_count("task weight", weigh(task)) for task in task_list]
    started = time.monotonic()
    if not task_list:
        if progress is not None:
            progress.start(0, 0)
            progress.close()
        return PoolSummary(0, 0, 0, time.monotonic() - started, 0, 0, 0)

    import ray

    if not ray.is_initialized():
        raise ConfigError("run_shards needs a running Ray; call it inside `with ray_runtime(...)`")
    resources = ray.cluster_resources()
    if use_gpu:
        available = int(resources.get("GPU", 0))
        if available < 1:
            raise ConfigError("use_gpu=True but the Ray cluster has no GPUs")
        workers = num_workers if num_workers is not None else available
    else:
        available = int(resources.get("CPU", 0) // cpus_per_worker) if cpus_per_worker else len(task_list)
        workers = num_workers if num_workers is not None else max(available, 1)
    if workers > available:
        logger.warning(
            "%d pool actors requested but the cluster has room for %d now; the rest wait for resources",
            workers,
            available,
        )
    workers = min(workers, len(task_list))
    logger.info(
        "running %d tasks on %d pool actors (%g CPU%s each)",
        len(task_list),
        workers,
        cpus_per_worker,
        " + 1 GPU" if use_gpu else "",
    )
    pool = _ShardPool(
        ray,
        task_list,
        weights,
        worker_factory,
        num_workers=workers,
        use_gpu=use_gpu,
        cpus_per_worker=cpus_per_worker,
        max_attempts=max_attempts,
        max_in_flight=max_in_flight,
        max_replacements=workers * max_attempts if max_replacements is None else max_replacements,
        on_result=on_result,
        on_failure=on_failure,
        count_of=count_of if count_of is not None else _default_count,
        progress=progress,
        startup_timeout_s=startup_timeout_s,
        poll_s=poll_s,
    )
    if progress is not None:
        progress.start(sum(weights), len(task_list))
    try:
        pool.run()
    finally:
        pool.shutdown()
        if progress is not None:
            progress.close()
    return PoolSummary(
        done=pool.done,
        failed=pool.failed,
        retried=pool.retried,
        elapsed_s=time.monotonic() - started,
        items=pool.items,
        actors_started=pool.actors_started,
        actors_lost=pool.actors_lost,
    )
