"""What every reduction does around its math: refuse an incomplete store, hold the store's lock, skip a
rerun that would write the same result, and write its result groups whole.

    with begin_reduction(store, "textspan", settings, allow_incomplete=False, force=False) as run:
        if run.is_current(group):          # same settings, same extraction: a no-op
            ...read the stored result...
        else:
            run.write_group(group, {"indices": (array, ("head", "pick")), ...}, attrs)

* **Complete inputs.** An extracted store whose shards are not all done (failed or never finished)
  is refused with one line that says how many and how to finish them; ``allow_incomplete`` reduces
  the done shards only (rows of other shards are never valid, see ``RunStore.read_valid``) and the
  result's record says so.
* **One writer.** The run holds the store's ``lock.json`` (the lock extraction takes); a second run —
  another reduction or an extraction — is refused with the owner's host and pid. Reentrant within a
  process, so a reduction may call another (TextSpan computes means).
* **Complete or absent.** ``write_group`` is ``RunStore.write_result_group``: a killed run leaves no
  group a reader could take for complete.
* **Rerun no-op.** Each group records ``{job, settings, inputs, code_version}`` in its
  ``clipscope_result`` attribute; ``inputs`` fingerprints the extraction (every done shard's row
  checksum). A run whose record equals the stored one is current (another clipscope version
  recomputes); ``force`` recomputes. Stores without a manifest (built by
  hand with ``write_rows``) have no fingerprint and are always recomputed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipscope.version import __version__
from clipscope.errors import ConfigError, StoreError
from clipscope.storage.lock import acquire_lock
from clipscope.storage.store import RunStore

RESULT_ATTR = "clipscope_result"
"""Group attribute of a reduction's result: ``{job, settings, inputs, code_version[, incomplete]}``."""

log = logging.getLogger(__name__)

_held: dict[str, int] = {}
_held_lock = threading.Lock()


class IncompleteStoreError(StoreError):
    """A reduction was asked of a store whose extraction is not finished."""


@dataclass(frozen=True)
class Completeness:
    """How many of an extracted store's shards are done, failed, or neither (never finished)."""

    shards: int
    done: int
    failed: int

    @property
    def missing(self) -> int:
        return self.shards - self.done - self.failed

    @property
    def complete(self) -> bool:
        return self.done == self.shards

    def as_dict(self) -> dict[str, int]:
        return {"shards": self.shards, "done": self.done, "failed": self.failed, "missing": self.missing}


def completeness(store: RunStore) -> Completeness | None:
    """Done / failed / unfinished shards of an extracted store; None when rows are not planned per shard."""
    blocks = store.attrs.get("row_blocks")
    if not blocks:
        return None
    records = store.shard_records(stage="extract")
    done = sum(1 for i, r in records.items() if r.get("status") == "done" and i < len(blocks))
    failed = sum(1 for i, r in records.items() if r.get("status") == "failed" and i < len(blocks))
    return Completeness(len(blocks), done, failed)


def extract_command(store: RunStore) -> str:
    return f"clipscope extract … --out {store.url}"


def incomplete_message(store: RunStore, state: Completeness, job: str) -> str:
    parts = [f"{n} {what}" for n, what in ((state.failed, "failed"), (state.missing, "unfinished")) if n]
    retry = " --retry-failed" if state.failed else ""
    text = (f"{job}: {store.url} is incomplete: {state.shards - state.done} of {state.shards} shards are not "
            f"extracted ({', '.join(parts)}); finish them by rerunning the `{extract_command(store)}{retry}` "
            f"command that made the store, or pass \0 to reduce the {state.done} done shards only")
    # a template for ClipscopeError(parameters=…): literal braces doubled, the parameter a field
    return text.replace("{", "{{").replace("}", "}}").replace("\0", "{allow_incomplete}")


def extraction_fingerprint(store: RunStore) -> str | None:
    """sha256 (16 hex digits) over the store's done shards and their row checksums; None without a manifest."""
    if not store.attrs.get("row_blocks"):
        return None
    records = store.shard_records(stage="extract")
    done = sorted((i, r.get("checksum")) for i, r in records.items() if r.get("status") == "done")
    payload = json.dumps({"n_rows": store.n_rows, "done": done}, sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def settings_digest(value: Any) -> str:
    """A short digest of a JSON value or an array (e.g. the PCs a later job starts from)."""
    if isinstance(value, np.ndarray):
        data = np.ascontiguousarray(value).tobytes() + str((value.dtype.str, value.shape)).encode()
    else:
        data = json.dumps(value, sort_keys=True, allow_nan=False).encode()
    return hashlib.sha256(data).hexdigest()[:16]


@contextlib.contextmanager
def store_lock(store: RunStore, owner: str) -> Iterator[None]:
    """Hold the store's writer lock (reentrant within this process); nothing for a read-only store."""
    if store.mode != "r+":
        yield
        return
    key = store.url
    with _held_lock:
        nested = _held.get(key, 0) > 0
        if nested:
            _held[key] += 1
    if nested:
        try:
            yield
        finally:
            with _held_lock:
                _held[key] -= 1
        return
    with acquire_lock(store.url, store.storage_options, owner=owner):
        with _held_lock:
            _held[key] = 1
        try:
            yield
        finally:
            with _held_lock:
                _held.pop(key, None)


@dataclass
class Reduction:
    """A reduction in progress: its record, the no-op test, atomic group writes."""

    store: RunStore
    job: str
    settings: dict[str, Any]
    inputs: str | None
    force: bool = False
    incomplete: Completeness | None = None
    reused: list[str] = field(default_factory=list)

    def record(self, **extra_settings: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"job": self.job, "settings": {**self.settings, **extra_settings},
                               "inputs": self.inputs, "code_version": __version__}
        if self.incomplete is not None:
            out["incomplete"] = self.incomplete.as_dict()
        return json.loads(json.dumps(out, sort_keys=True))

    def is_current(self, group: str, **extra_settings: Any) -> bool:
        """True when ``group`` is complete and was written by this job with these settings from this
        extraction (never with ``force``, a store without a manifest, or a read-only store's missing group)."""
        if self.force or self.inputs is None:
            return False
        attrs = self.store.result_group_attrs(group)
        if attrs is None or attrs.get(RESULT_ATTR) != self.record(**extra_settings):
            return False
        self.reused.append(group)
        log.info("%s: %s is up to date (same settings, same extraction), not recomputed; force recomputes it",
                 self.job, group)
        return True

    def write_group(self, group: str, arrays: Mapping[str, tuple], attrs: Mapping[str, Any] | None = None,
                    **extra_settings: Any) -> list[str]:
        """``RunStore.write_result_group`` with this run's record in the group's attributes."""
        full = {**dict(attrs or {}), RESULT_ATTR: self.record(**extra_settings)}
        return self.store.write_result_group(group, arrays, full)

    def is_current_array(self, name: str, **extra_settings: Any) -> bool:
        """``is_current`` for one result array added to another job's group (``write_array``)."""
        if self.force or self.inputs is None or name not in self.store.array_names():
            return False
        if self.store.array(name).attrs.get(RESULT_ATTR) != self.record(**extra_settings):
            return False
        self.reused.append(name)
        log.info("%s: %s is up to date (same settings, same extraction), not recomputed; force recomputes it",
                 self.job, name)
        return True

    def write_array(self, name: str, data: np.ndarray, dims: Sequence[str], attrs: Mapping[str, Any] | None = None,
                    **extra_settings: Any) -> None:
        """``RunStore.write_result`` (complete or absent) with this run's record in the array's attributes."""
        full = {**dict(attrs or {}), RESULT_ATTR: self.record(**extra_settings)}
        self.store.write_result(name, data, dims, full)


@contextlib.contextmanager
def begin_reduction(store: RunStore, job: str, settings: Mapping[str, Any], *, allow_incomplete: bool = False,
                    force: bool = False) -> Iterator[Reduction]:
    """Check the store is complete (or ``allow_incomplete``), take its lock, yield the Reduction."""
    if not isinstance(allow_incomplete, bool):
        raise ConfigError(f"allow_incomplete must be True or False, got {allow_incomplete!r}")
    if not isinstance(force, bool):
        raise ConfigError(f"force must be True or False, got {force!r}")
    state = completeness(store)
    partial = None
    if state is not None and not state.complete:
        if not allow_incomplete:
            raise IncompleteStoreError(incomplete_message(store, state, job), parameters=("allow_incomplete",))
        partial = state
        log.warning("%s: %s is incomplete (%d of %d shards done); reducing the done shards only, as "
                    "allow_incomplete asks (recorded in the result's attributes)", job, store.url, state.done,
                    state.shards)
    with store_lock(store, f"clipscope {job}"):
        store.forget_done_rows()
        yield Reduction(store, job, json.loads(json.dumps(dict(settings), sort_keys=True)),
                        extraction_fingerprint(store), force, partial)
