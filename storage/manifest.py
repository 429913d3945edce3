"""Per-shard completion records under ``manifest/{stage}/`` — the resume mechanism.

``done-{index:06d}.json`` is written (atomically) only after a shard's rows are in the store, so its
presence means "these rows are final"; ``failed-{index:06d}.json`` records a failure so status can
show it. A resumed run skips done shards and rewrites every other shard's rows whole. ``stage``
separates jobs that write rows of the same store (``extract``, a later ``neurons`` job, …).

Record of a finished shard: ``{index, status: "done", url, count, valid, errors, seconds, checksum,
finished}`` plus any extra JSON keys the caller adds (``start``, ``capacity``…).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from clipscope.errors import ConfigError, StoreError
from clipscope.storage.layout import _is_int

if TYPE_CHECKING:
    from clipscope.storage.store import RunStore

MANIFEST_DIR = "manifest"
DONE_KEYS = ("url", "count", "valid", "errors", "seconds", "checksum")
FAILED_KEYS = ("url", "error")
_STAGE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_FILE = re.compile(r"^(done|failed)-(\d{6,})\.json$")


def _check_stage(stage: str) -> str:
    if not isinstance(stage, str) or not _STAGE.match(stage):
        raise ConfigError(f"stage must be a name of letters, digits, '_', '.', '-', got {stage!r}")
    return stage


def _check_index(index: int) -> int:
    if not _is_int(index) or index < 0:
        raise ConfigError(f"shard index must be an integer ≥ 0, got {index!r}")
    return int(index)


def _file(status: str, index: int) -> str:
    return f"{status}-{index:06d}.json"


def _write_record(store: RunStore, stage: str, status: str, index: int, record: Mapping[str, Any],
                  required: Sequence[str]) -> dict[str, Any]:
    if not isinstance(record, Mapping):
        raise ConfigError(f"shard record must be a dict, got {type(record).__name__}")
    missing = [k for k in required if k not in record]
    if missing:
        raise ConfigError(f"{status} record of shard {index} misses keys {missing} (needs {list(required)})")
    out = {**dict(record), "index": index, "status": status, "finished": time.time()}
    try:
        payload = json.dumps(out, allow_nan=False, sort_keys=True).encode()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{status} record of shard {index} must be JSON-serialisable: {exc}") from exc
    store.location.write_bytes_atomic(payload, MANIFEST_DIR, stage, _file(status, index))
    return out


def mark_shard_done(store: RunStore, index: int, record: Mapping[str, Any], *, stage: str = "extract") -> None:
    """Record that shard ``index`` is complete. Call only after its rows are written."""
    store._require_writable("mark_shard_done")
    index, stage = _check_index(index), _check_stage(stage)
    for key in ("count", "valid", "errors"):
        if key in record and (not _is_int(record[key]) or record[key] < 0):
            raise ConfigError(f"{key!r} of shard {index} must be an integer ≥ 0, got {record[key]!r}")
    _write_record(store, stage, "done", index, record, DONE_KEYS)
    store.location.remove(MANIFEST_DIR, stage, _file("failed", index))


def mark_shard_failed(store: RunStore, index: int, record: Mapping[str, Any], *, stage: str = "extract") -> None:
    """Record that shard ``index`` failed (its rows are not trustworthy; any done record is dropped)."""
    store._require_writable("mark_shard_failed")
    index, stage = _check_index(index), _check_stage(stage)
    store.location.remove(MANIFEST_DIR, stage, _file("done", index))
    _write_record(store, stage, "failed", index, record, FAILED_KEYS)


def clear_shard(store: RunStore, index: int, *, stage: str = "extract") -> None:
    """Forget shard ``index`` (before rewriting its rows)."""
    store._require_writable("clear_shard")
    index, stage = _check_index(index), _check_stage(stage)
    store.location.remove(MANIFEST_DIR, stage, _file("done", index))
    store.location.remove(MANIFEST_DIR, stage, _file("failed", index))


def shard_records(store: RunStore, *, stage: str = "extract") -> dict[int, dict[str, Any]]:
    """All records of a stage by shard index; a done record wins over a leftover failed one."""
    stage = _check_stage(stage)
    records: dict[int, dict[str, Any]] = {}
    for name in store.location.list_names(MANIFEST_DIR, stage):
        match = _FILE.match(name)
        if not match:
            continue  # temp files of an interrupted write, foreign files
        status, index = match.group(1), int(match.group(2))
        if status == "failed" and records.get(index, {}).get("status") == "done":
            continue
        raw = store.location.read_bytes(MANIFEST_DIR, stage, name)
        if raw is None:
            continue  # removed between listing and reading (a concurrent clear)
        try:
            record = json.loads(raw)
        except ValueError as exc:
            raise StoreError(f"corrupt manifest record {store.location.child_url(MANIFEST_DIR, stage, name)}: {exc}") from exc
        records[index] = record
    return dict(sorted(records.items()))


def done_indices(store: RunStore, *, stage: str = "extract") -> set[int]:
    """Indices of the shards with a done record (from the folder listing alone, no record is read)."""
    stage = _check_stage(stage)
    found = set()
    for name in store.location.list_names(MANIFEST_DIR, stage):
        match = _FILE.match(name)
        if match and match.group(1) == "done":
            found.add(int(match.group(2)))
    return found


def manifest_stages(store: RunStore) -> list[str]:
    """Stages that have a manifest folder."""
    return [s for s in store.location.list_names(MANIFEST_DIR) if _STAGE.match(s)]


def rows_checksum(store: RunStore, start: int, capacity: int, names: Sequence[str] | None = None) -> str:
    """sha256 over rows [start, start + capacity) of the per-sample arrays (all of them by default).

    Arrays are hashed in sorted name order, each as its name, dtype, shape and little-endian C-order
    bytes, read one chunk of rows at a time; stable across machines and backends.
    """
    if not _is_int(start) or not _is_int(capacity) or start < 0 or capacity < 0:
        raise ConfigError(f"start and capacity must be integers ≥ 0, got {start!r}, {capacity!r}")
    if start + capacity > store.n_rows:
        raise StoreError(f"rows [{start}, {start + capacity}) exceed the store's n_rows={store.n_rows}")
    if names is None:
        names = store.array_names(per_sample=True)
    digest = hashlib.sha256()
    step = store.rows_per_chunk
    for name in sorted(names):
        if not store.is_per_sample(name):
            raise StoreError(f"rows_checksum covers per-sample arrays; {name!r} is not one")
        arr = store.array(name)
        dtype = np.dtype(arr.dtype).newbyteorder("<")
        digest.update(f"{name}|{dtype.str}|{capacity},{','.join(map(str, arr.shape[1:]))}|".encode())
        for lo in range(start, start + capacity, step):
            block = store.read(name, slice(lo, min(lo + step, start + capacity)))
            digest.update(np.ascontiguousarray(block, dtype=dtype).tobytes())
    return digest.hexdigest()
