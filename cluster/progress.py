"""Progress of long work measured in items (images): done, rate, ETA, failed and retried tasks.

Work arrives in tasks (shards) that each carry an expected item count; a finished task reports its
actual count, which corrects the total, and a failed task's expected items leave the total, so the
ETA is always "remaining items / average rate so far". Shown as a tqdm bar on stderr when that is a
terminal, as an INFO log line every ``log_interval_s`` otherwise (batch jobs, ``ray job submit``),
or not at all; the counts are tracked either way (``snapshot()``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from clipscope.errors import ConfigError

logger = logging.getLogger(__name__)

_DISPLAYS = ("auto", "bar", "log", "off")


@dataclass(frozen=True)
class ProgressSnapshot:
    """Counts at one moment. items_total is the expected total, corrected as tasks finish or fail."""

    items_done: int
    items_total: int
    tasks_done: int
    tasks_failed: int
    tasks_total: int
    retries: int
    elapsed_s: float

    @property
    def items_per_s(self) -> float | None:
        if self.elapsed_s <= 0 or self.items_done == 0:
            return None
        return self.items_done / self.elapsed_s

    @property
    def eta_s(self) -> float | None:
        rate = self.items_per_s
        if rate is None:
            return None
        return max(self.items_total - self.items_done, 0) / rate


def format_duration(seconds: float | None) -> str:
    """``1h02m03s`` / ``4m05s`` / ``6s``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_snapshot(snap: ProgressSnapshot, desc: str, unit: str) -> str:
    """The one-line summary used by log mode and by ``close()``."""
    percent = 100.0 * snap.items_done / snap.items_total if snap.items_total else 100.0
    rate = snap.items_per_s
    rate_text = "?" if rate is None else f"{rate:.1f}"
    return (
        f"{desc}: {snap.items_done}/{snap.items_total} {unit} ({percent:.0f}%), "
        f"{rate_text} {unit}/s, ETA {format_duration(snap.eta_s)}, elapsed {format_duration(snap.elapsed_s)}; "
        f"tasks {snap.tasks_done}/{snap.tasks_total} done, {snap.tasks_failed} failed, {snap.retries} retried"
    )


def _check_non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be an integer ≥ 0, got {value!r}")
    return value


class Progress:
    """Progress display for ``run_shards`` (or any loop over weighted tasks).

    display: "auto" (bar when ``stream`` is a TTY, else log lines), "bar", "log" or "off".
    enabled=False is the same as display="off". clock is injectable for tests.
    """

    def __init__(
        self,
        desc: str = "images",
        *,
        unit: str = "img",
        enabled: bool = True,
        display: str = "auto",
        log_interval_s: float = 30.0,
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if display not in _DISPLAYS:
            raise ConfigError(f"display must be one of {_DISPLAYS}, got {display!r}")
        if not isinstance(log_interval_s, (int, float)) or log_interval_s < 0:
            raise ConfigError(f"log_interval_s must be a number ≥ 0, got {log_interval_s!r}")
        self.desc = desc
        self.unit = unit
        self._stream = stream
        self._clock = clock
        self._log_interval_s = float(log_interval_s)
        self._display = "off" if not enabled else display
        self._bar: Any = None
        self._started_at: float | None = None
        self._last_log_at = 0.0
        self._items_done = 0
        self._items_total = 0
        self._tasks_done = 0
        self._tasks_failed = 0
        self._tasks_total = 0
        self._retries = 0
        self._closed = False

    @property
    def mode(self) -> str:
        """The resolved display: "bar", "log" or "off"."""
        if self._display != "auto":
            return self._display
        stream = self._stream if self._stream is not None else sys.stderr
        isatty = getattr(stream, "isatty", None)
        return "bar" if isatty is not None and isatty() else "log"

    def start(self, items_total: int, tasks_total: int) -> None:
        """Begin timing; items_total is the expected item count over tasks_total tasks."""
        self._items_total = _check_non_negative_int("items_total", items_total)
        self._tasks_total = _check_non_negative_int("tasks_total", tasks_total)
        self._started_at = self._clock()
        self._last_log_at = self._started_at
        self._closed = False
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(
                total=self._items_total,
                desc=self.desc,
                unit=self.unit,
                file=self._stream if self._stream is not None else sys.stderr,
                dynamic_ncols=True,
                smoothing=0.1,
            )

    def advance(self, items: int, *, expected: int | None = None) -> None:
        """One task finished with ``items`` items; ``expected`` (its planned count) corrects the total."""
        items = _check_non_negative_int("items", items)
        if expected is not None:
            self._items_total += items - _check_non_negative_int("expected", expected)
        self._items_done += items
        self._tasks_done += 1
        if self._bar is not None:
            if expected is not None and items != expected:
                self._bar.total = self._items_total
            self._bar.update(items)
            self._update_postfix()
        self.tick()

    def fail(self, *, expected: int = 0) -> None:
        """One task failed for good; its ``expected`` items will never come."""
        self._items_total -= _check_non_negative_int("expected", expected)
        self._tasks_failed += 1
        if self._bar is not None:
            self._bar.total = self._items_total
            self._update_postfix()
            self._bar.refresh()
        self.tick()

    def retry(self) -> None:
        """One task is being run again."""
        self._retries += 1
        if self._bar is not None:
            self._update_postfix()

    def tick(self) -> None:
        """Emit a log line if log mode is on and ``log_interval_s`` has passed since the last one."""
        if self.mode != "log" or self._started_at is None or self._closed:
            return
        now = self._clock()
        if now - self._last_log_at >= self._log_interval_s:
            self._last_log_at = now
            logger.info(format_snapshot(self.snapshot(), self.desc, self.unit))

    def snapshot(self) -> ProgressSnapshot:
        started = self._started_at if self._started_at is not None else self._clock()
        return ProgressSnapshot(
            items_done=self._items_done,
            items_total=self._items_total,
            tasks_done=self._tasks_done,
            tasks_failed=self._tasks_failed,
            tasks_total=self._tasks_total,
            retries=self._retries,
            elapsed_s=self._clock() - started,
        )

    def close(self) -> None:
        """Finish the bar, or log the final line in log mode. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "log" and self._started_at is not None:
            logger.info(format_snapshot(self.snapshot(), self.desc, self.unit))

    def _update_postfix(self) -> None:
        if self._tasks_failed or self._retries:  # nothing to say while every task succeeds first time
            self._bar.set_postfix(failed=self._tasks_failed, retried=self._retries, refresh=False)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
