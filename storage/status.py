"""What a run store holds and how far its run got: ``store_status`` (a dict) and ``format_status`` (text)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np

from clipscope.storage.layout import SCHEMA_ATTR
from clipscope.storage.lock import STALE_AFTER_S, _judge, _read_lock
from clipscope.storage.manifest import manifest_stages, shard_records
from clipscope.storage.sample_index import read_samples
from clipscope.storage.store import RunStore

_SKIP_ATTRS = {SCHEMA_ATTR, "n_rows", "rows_per_chunk", "shards"}


def _summarise_attrs(attrs: dict[str, Any], prefix: str = "", depth: int = 0) -> dict[str, Any]:
    """Attributes flattened to dotted keys (two levels deep); lists kept whole."""
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if not prefix and key in _SKIP_ATTRS:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            if depth < 2:
                out.update(_summarise_attrs(value, name + ".", depth + 1))
        elif isinstance(value, list):
            out[name] = list(value)
        else:
            out[name] = value
    return out


def _stored_bytes(store: RunStore, name: str) -> tuple[int, int]:
    """(bytes, number of chunk objects) stored for an array, from one listing of its prefix."""
    location = store.location
    prefix = location.path(name)
    location.fs.invalidate_cache(prefix)
    try:
        entries = location.fs.find(prefix, detail=True)
    except FileNotFoundError:
        return 0, 0
    total = count = 0
    for path, info in entries.items():
        if path.rstrip("/").endswith("/zarr.json") or info.get("type") == "directory":
            continue
        total += int(info.get("size") or 0)
        count += 1
    return total, count


def verify_rows(store: RunStore, stage: str = "extract") -> dict[str, Any]:
    """Recompute the row checksum of every done shard that recorded one; list the ones that differ.

    A corrupted chunk (bytes changed on disk, or no longer decodable) makes its shard's checksum
    differ; each entry names the shard, its rows and its chunks along ``sample``.
    """
    checked, corrupt = 0, []
    for index, record in shard_records(store, stage=stage).items():
        if record.get("status") != "done" or not {"start", "capacity", "checksum"} <= set(record):
            continue
        start, capacity = int(record["start"]), int(record["capacity"])
        if capacity == 0:
            continue
        checked += 1
        try:
            same = store.rows_checksum(start, capacity) == record["checksum"]
            problem = "rows differ from their recorded checksum"
        except Exception as err:  # noqa: BLE001 - a chunk that no longer decodes is corruption too
            same, problem = False, f"rows cannot be read: {type(err).__name__}: {err}"
        if not same:
            rpc = store.rows_per_chunk
            corrupt.append({"index": index, "url": record.get("url"), "rows": [start, start + capacity],
                            "chunks": [start // rpc, (start + capacity - 1) // rpc], "problem": problem})
    return {"stage": stage, "checked": checked, "corrupt": corrupt}


def store_status(url: str, storage_options: dict[str, Any] | None = None, *, verify: bool = False) -> dict[str, Any]:
    """Shards done/failed/pending per stage, samples and errors, valid rows, config summary, bytes;
    with ``verify``, every done shard's rows checked against their recorded checksum."""
    store = RunStore.open(url, mode="r", storage_options=storage_options)
    attrs = store.attrs
    shard_urls = attrs.get("shards") if isinstance(attrs.get("shards"), list) else None

    stages: dict[str, Any] = {}
    for stage in sorted(set(manifest_stages(store)) | {"extract"}):
        records = shard_records(store, stage=stage)
        done = sorted(i for i, r in records.items() if r.get("status") == "done")
        failed = [
            {"index": i, "url": r.get("url"), "error": r.get("error")}
            for i, r in records.items()
            if r.get("status") == "failed"
        ]
        pending = None
        if shard_urls is not None:
            pending = [i for i in range(len(shard_urls)) if i not in records]
        # Done shards that were not read whole (truncated tar, stale counts): samples lost and why.
        partial = [
            {"index": i, "url": records[i].get("url"), "samples_lost": records[i].get("lost"),
             "reason": "; ".join(records[i]["shard_errors"])}
            for i in done
            if records[i].get("shard_errors")
        ]
        stages[stage] = {
            "done": len(done),
            "failed": failed,
            "pending": pending,
            "partial": partial,
            "samples_lost": sum(p["samples_lost"] or 0 for p in partial),
            "samples_lost_unknown": sum(p["samples_lost"] is None for p in partial),
            "samples_done": sum(int(records[i].get("count", 0)) for i in done),
            "seconds": sum(float(records[i].get("seconds", 0.0)) for i in done),
        }

    samples = read_samples(store)
    errors = [e for e in samples["error"].to_pylist() if e is not None]
    valid = store.read_valid()
    arrays = {}
    for name in store.array_names():
        arr = store.array(name)
        stored, chunks = _stored_bytes(store, name)
        arrays[name] = {
            "dims": list(store.dims(name)),
            "shape": list(arr.shape),
            "dtype": str(arr.dtype),
            "per_sample": store.is_per_sample(name),
            "stored_bytes": stored,
            "chunks_stored": chunks,
            "nbytes": int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize,
        }
    lock = _read_lock(store.location)
    return {
        "url": store.url,
        "schema_version": attrs.get(SCHEMA_ATTR),
        "n_rows": store.n_rows,
        "rows_per_chunk": store.rows_per_chunk,
        "shards_total": None if shard_urls is None else len(shard_urls),
        "stages": stages,
        "samples": samples.num_rows,
        "sample_errors": len(errors),
        "error_counts": dict(Counter(errors).most_common()),
        "valid_rows": int(valid.sum()),
        "invalid_rows": int(valid.size - valid.sum()),
        "config": _summarise_attrs(attrs),
        "model": attrs.get("model"),
        "random_init": _random_init(attrs.get("model")),
        "arrays": arrays,
        "stored_bytes": sum(a["stored_bytes"] for a in arrays.values()),
        "lock": None if lock is None else _lock_status(lock),
        "verify": verify_rows(store) if verify else None,
    }


def _random_init(model: dict[str, Any] | None) -> bool:
    """The store was extracted from never-trained weights (`--pretrained none` on an architecture name)."""
    if not model:
        return False
    return (str(model.get("pretrained", "none")).lower() in ("none", "")
            and not str(model.get("name", "")).startswith(("hf-hub:", "local-dir:")))


def _show(value: Any, limit: int = 6) -> str:
    """A config value as text: lists joined (the first `limit` items and the count when longer)."""
    if isinstance(value, list):
        if not value:
            return "(none)"
        if not all(isinstance(v, (str, int, float, bool)) or v is None for v in value):
            return f"{len(value)} entries (all of them in --json)"
        shown = ", ".join(map(str, value[:limit]))
        return f"{shown}, … ({len(value)} items)" if len(value) > limit else shown
    return str(value)


def _lock_status(lock: dict[str, Any]) -> dict[str, Any]:
    """The lock's owner and whether it is ``held`` (a live owner) or ``stale`` (the next writer takes it)."""
    out = {k: lock.get(k) for k in ("host", "pid", "owner", "heartbeat")}
    why = "the lock file is corrupt" if lock.get("corrupt") else _judge(lock, STALE_AFTER_S, time.time())
    out["state"] = "held" if why is None else "stale"
    out["stale_reason"] = why
    return out


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def format_status(d: dict[str, Any], *, max_errors: int = 10) -> str:
    """A readable multi-line report of ``store_status``."""
    out = [f"run store  {d['url']}  (schema v{d['schema_version']})"]
    total = d["shards_total"]
    out.append(
        f"rows       {d['n_rows']} ({d['rows_per_chunk']} per chunk): {d['valid_rows']} valid, "
        f"{d['invalid_rows']} invalid or padding"
    )
    out.append(f"samples    {d['samples']} indexed, {d['sample_errors']} with errors")
    model = d.get("model") or {}
    if model:
        weights = model.get("pretrained")
        out.append(f"model      {model.get('name')}, weights {weights}"
                   + ("  — RANDOM INIT: never trained; results describe noise" if d.get("random_init") else ""))
    if d["lock"]:
        lock = d["lock"]
        if lock.get("state") == "stale":
            out.append(f"lock       stale: left by host {lock['host']!r} pid {lock['pid']} ({lock['owner']}); "
                       f"{lock['stale_reason']}; the next writer takes it over")
        else:
            out.append(f"lock       held by host {lock['host']!r} pid {lock['pid']} ({lock['owner']})")
    out.append("")
    rows = []
    for stage, s in d["stages"].items():
        pending = "?" if s["pending"] is None else str(len(s["pending"]))
        rows.append([stage, f"{s['done']}" + (f"/{total}" if total is not None else ""),
                     str(len(s["failed"])), pending, str(s["samples_done"]), f"{s['seconds']:.1f}"])
    out += _table(["stage", "done", "failed", "pending", "samples", "seconds"], rows)
    if d.get("verify"):
        v = d["verify"]
        out.append(f"  verify: {v['checked']} done shard(s) checked, {len(v['corrupt'])} corrupted")
        for c in v["corrupt"][:max_errors]:
            out.append(f"  corrupted {v['stage']} shard {c['index']} {c['url']}: rows {c['rows'][0]}–{c['rows'][1] - 1} "
                       f"(chunks {c['chunks'][0]}–{c['chunks'][1]}): {c['problem']}")
    failures = [(stage, f) for stage, s in d["stages"].items() for f in s["failed"]]
    for stage, f in failures[:max_errors]:
        out.append(f"  failed {stage} shard {f['index']} {f['url']}: {f['error']}")
    partial = [(stage, p) for stage, s in d["stages"].items() for p in s.get("partial", [])]
    if partial:
        lost = sum(s.get("samples_lost", 0) for s in d["stages"].values())
        unknown = sum(s.get("samples_lost_unknown", 0) for s in d["stages"].values())
        out.append(f"  {len(partial)} done shard(s) not read whole: {lost} samples lost"
                   + (f", plus an unknown number in {unknown} truncated shard(s)" if unknown else ""))
    for stage, p in partial[:max_errors]:
        lost = "an unknown number of samples" if p["samples_lost"] is None else f"{p['samples_lost']} sample(s)"
        out.append(f"  partial {stage} shard {p['index']} {p['url']}: {lost} lost: {p['reason']}")
    if d["error_counts"]:
        out.append("")
        out += _table(["sample error", "count"],
                      [[e[:80], str(c)] for e, c in list(d["error_counts"].items())[:max_errors]])
    out.append("")
    out += _table(
        ["array", "dims", "shape", "dtype", "stored", "of"],
        [[name, ",".join(a["dims"]), "×".join(map(str, a["shape"])), a["dtype"],
          _human(a["stored_bytes"]), _human(a["nbytes"])] for name, a in d["arrays"].items()],
    )
    out.append(f"total stored {_human(d['stored_bytes'])}")
    if d["config"]:
        out.append("")
        out += _table(["config", "value"], [[k, _show(v)[:100]] for k, v in d["config"].items()])
    return "\n".join(out)
