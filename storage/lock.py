"""One writing run per store: ``lock.json`` at the store root with owner, host, pid and heartbeat.

A lock is live while its owner is: on this host, while its pid exists (and, on Linux, is the same
process — pid reuse is detected from the process start time); on another host, while its heartbeat
is younger than ``stale_after_s``. A dead or stale lock is taken over with a warning. Release
removes the file only if it still holds our token.

Guarantees: on a local disk creation is exclusive (``O_EXCL``) and takeover renames the stale file
away first, so two racing writers cannot both win. fsspec offers no compare-and-swap on object
stores, so there the lock is best-effort (write, then read back our token) — enough to stop the
common mistake of starting the same run twice, not a distributed mutex. Hosts compare heartbeats
with their own clocks, so keep ``stale_after_s`` well above the clock skew.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from clipscope.errors import ConfigError, StoreError
from clipscope.storage.location import Location

LOCK_FILE = "lock.json"
# A lock of another host whose heartbeat is older than this is taken over (and shown "stale").
STALE_AFTER_S = 600.0
log = logging.getLogger(__name__)


class StaleLockWarning(UserWarning):
    """A lock left by a dead or silent writer was taken over."""


def _process_start(pid: int) -> str | None:
    """Start time of a process in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    # Field 22 counts after the ')' that closes the command name (which may contain spaces).
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OverflowError:
        return False
    return True


def _describe(rec: dict[str, Any], now: float) -> str:
    owner = f" ({rec['owner']})" if rec.get("owner") else ""
    beat = rec.get("heartbeat")
    age = f"{now - beat:.0f} s ago" if isinstance(beat, (int, float)) else "never"
    started = rec.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"host {rec.get('host')!r}, pid {rec.get('pid')}{owner}, started {when}, last heartbeat {age}"


def _judge(rec: dict[str, Any], stale_after_s: float, now: float) -> str | None:
    """None when the lock's owner is live, else why it is not."""
    host, pid = rec.get("host"), rec.get("pid")
    if host == socket.gethostname() and isinstance(pid, int):
        if not _pid_alive(pid):
            return f"its process {pid} on this host is gone"
        recorded, current = rec.get("proc_start"), _process_start(pid)
        if recorded is not None and current is not None and recorded != current:
            return f"pid {pid} on this host now belongs to another process"
        return None
    beat = rec.get("heartbeat")
    if not isinstance(beat, (int, float)):
        return "it has no heartbeat"
    if now - beat > stale_after_s:
        return f"its heartbeat is {now - beat:.0f} s old (stale after {stale_after_s:g} s)"
    return None


@dataclass
class StoreLock:
    """A held lock; ``heartbeat()`` refreshes it (a background thread does so unless disabled)."""

    location: Location
    record: dict[str, Any]
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def token(self) -> str:
        return self.record["token"]

    def _read(self) -> dict[str, Any] | None:
        return _read_lock(self.location)

    def heartbeat(self) -> None:
        """Refresh the heartbeat; StoreError if another writer has taken the lock over."""
        with self._lock:
            current = self._read()
            if current is None or current.get("token") != self.token:
                who = _describe(current, time.time()) if current else "nobody (the file is gone)"
                raise StoreError(f"lost the lock of {self.location.url}: it is now held by {who}")
            self.record["heartbeat"] = time.time()
            self.location.write_bytes_atomic(_encode(self.record), LOCK_FILE)

    def _beat_forever(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.heartbeat()
            except Exception as exc:  # noqa: BLE001 - a background thread can only report
                log.warning("lock heartbeat of %s stopped: %s", self.location.url, exc)
                return

    def release(self) -> None:
        """Stop the heartbeat thread and remove the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            current = self._read()
            if current is not None and current.get("token") == self.token:
                self.location.remove(LOCK_FILE)


def current_token(location: Location) -> str | None:
    """The token of the lock now on a store (None when there is none)."""
    rec = _read_lock(location)
    return None if rec is None else rec.get("token")


def writer_gone(location: Location, token: str, stale_after_s: float = STALE_AFTER_S) -> str | None:
    """None while the lock holding ``token`` is on the store and its owner lives, else why not.

    Workers (Ray actors) that write for a lock holder call this before each write, so that they
    stop when their driver died or another run took the store over."""
    rec = _read_lock(location)
    if rec is None:
        return "the store's lock is gone"
    if rec.get("token") != token:
        return f"another writer took the store's lock over ({_describe(rec, time.time())})"
    return _judge(rec, stale_after_s, time.time())


def _encode(rec: dict[str, Any]) -> bytes:
    return json.dumps(rec, sort_keys=True).encode()


def _read_lock(location: Location) -> dict[str, Any] | None:
    raw = location.read_bytes(LOCK_FILE)
    if raw is None:
        return None
    try:
        rec = json.loads(raw)
    except ValueError:
        return {"corrupt": True}
    return rec if isinstance(rec, dict) else {"corrupt": True}


def _create_exclusive(location: Location, data: bytes) -> bool:
    """Write the lock file if none exists; False if one does."""
    if location.on_local_disk:
        os.makedirs(location.root, exist_ok=True)
        try:
            fd = os.open(location.path(LOCK_FILE), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    if location.exists(LOCK_FILE):
        return False
    location.write_bytes_atomic(data, LOCK_FILE)
    return True


def _remove_stale(location: Location, stale: dict[str, Any]) -> None:
    """Remove the lock file if it is still the stale record we judged."""
    if location.on_local_disk:
        path = location.path(LOCK_FILE)
        aside = f"{path}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        try:
            with open(aside, "rb") as f:
                moved = json.loads(f.read())
        except ValueError:
            moved = {"corrupt": True}
        if moved != stale:
            # Someone replaced it with a fresh lock in the meantime: put theirs back.
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
        os.unlink(aside)
        return
    if _read_lock(location) == stale:
        location.remove(LOCK_FILE)


@contextlib.contextmanager
def acquire_lock(
    store_url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    owner: str | None = None,
    stale_after_s: float = STALE_AFTER_S,
    heartbeat_every_s: float | None = None,
) -> Iterator[StoreLock]:
    """Hold the writer lock of a store for the duration of the ``with`` block.

    Raises StoreError naming the live owner's host and pid. ``heartbeat_every_s`` defaults to a
    third of ``stale_after_s``; 0 disables the background heartbeat (call ``lock.heartbeat()``).
    """
    if not isinstance(stale_after_s, (int, float)) or stale_after_s <= 0:
        raise ConfigError(f"stale_after_s must be a number > 0, got {stale_after_s!r}")
    every = stale_after_s / 3 if heartbeat_every_s is None else heartbeat_every_s
    if not isinstance(every, (int, float)) or every < 0:
        raise ConfigError(f"heartbeat_every_s must be a number ≥ 0, got {heartbeat_every_s!r}")
    location = Location(store_url, storage_options)
    now = time.time()
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "proc_start": _process_start(os.getpid()),
        "owner": owner,
        "started": now,
        "heartbeat": now,
        "token": uuid.uuid4().hex,
    }
    data = _encode(record)
    for _attempt in range(5):
        if _create_exclusive(location, data):
            held = _read_lock(location)
            if held is not None and held.get("token") == record["token"]:
                break
            continue
        existing = _read_lock(location)
        if existing is None:
            continue  # released between our attempt and the read
        reason = "the lock file is corrupt" if existing.get("corrupt") else _judge(existing, stale_after_s, time.time())
        if reason is None:
            raise StoreError(
                f"run store {location.url} is locked by another writer: {_describe(existing, time.time())}; "
                f"wait for it to finish, or delete {location.child_url(LOCK_FILE)} if you are sure it is dead"
            )
        message = f"taking over the lock of {location.url} from {_describe(existing, time.time())}: {reason}"
        # One report: a warning (the CLI prints it as one line), not also a log record.
        warnings.warn(message, StaleLockWarning, stacklevel=3)
        _remove_stale(location, existing)
    else:
        raise StoreError(f"could not acquire the lock of {location.url}: other writers keep racing for it")

    lock = StoreLock(location=location, record=record)
    if every > 0:
        lock._thread = threading.Thread(
            target=lock._beat_forever, args=(every,), name="clipscope-lock-heartbeat", daemon=True
        )
        lock._thread.start()
    try:
        yield lock
    finally:
        lock.release()
