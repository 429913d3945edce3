"""Store writes on a background thread, so that the next batches' forward runs while a chunk is
compressed and written (on a GPU the writes would otherwise stall the device).

`BackgroundWriter` runs the jobs handed to `submit` one at a time, in order, on one thread. At most
`depth` jobs wait: `submit` blocks beyond that (back-pressure bounds the chunks held in memory).
The first job that raises stops the rest (they are dropped) and its exception is raised again, with
its own type and errno, by the next `submit` or by `close`. `close` waits for every job; `abandon`
(the caller failed; leaving a ``with`` block by an exception does it) drops the waiting jobs and waits only for the one running, so that nothing
writes after it returns — a retried shard never races its own earlier attempt.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from clipscope.errors import ConfigError

_STOP = object()


class BackgroundWriter:
    def __init__(self, depth: int = 2, name: str = "clipscope-writer"):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ConfigError(f"depth must be an integer ≥ 1, got {depth!r}")
        self._jobs: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._dropping = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            if self._error is not None or self._dropping.is_set():
                continue
            try:
                job()
            except BaseException as err:  # re-raised in the caller's thread
                self._error = err

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, job: Callable[[], object]) -> None:
        """Queue `job`; blocks while `depth` jobs wait; raises an earlier job's error."""
        if self._closed:
            raise ConfigError("submit after close")
        self._raise()
        self._jobs.put(job)

    def close(self) -> None:
        """Wait until every submitted job ran; raise the first error of one."""
        if not self._closed:
            self._closed = True
            self._jobs.put(_STOP)
            self._thread.join()
        self._raise()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.abandon()

    def abandon(self) -> None:
        """Drop the waiting jobs and wait for the running one; errors are not raised."""
        if self._closed:
            return
        self._closed = True
        self._dropping.set()
        self._jobs.put(_STOP)
        self._thread.join()
