"""Row → sample index: ``samples/part-{index:06d}.parquet`` per shard, merged into ``samples.parquet``.

Columns: row (int64), key (string), shard (string, the shard URL), shard_index (int32),
label (int64, −1 when the sample has none), caption (string or null), error (string or null; a
sample whose decode failed keeps its row with ``valid=False`` and the error text here), group (int64,
−1 when the sample has none: the integer under ``extract --group-key`` in its json member; indices
written before the column existed read as −1).

Writing a part removes a previously merged ``samples.parquet`` (it would be stale); ``read_samples``
falls back to the parts until the next ``merge_samples``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipscope.errors import ConfigError, StoreError
from clipscope.storage.layout import _is_int

if TYPE_CHECKING:
    from clipscope.storage.store import RunStore

SAMPLES_DIR = "samples"
MERGED_FILE = "samples.parquet"
SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("shard_index", pa.int32(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("error", pa.string()),
        pa.field("group", pa.int64(), nullable=False),
    ]
)


def part_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _read_table(store: RunStore, *relative: str) -> pa.Table | None:
    raw = store.location.read_bytes(*relative)
    if raw is None:
        return None
    try:
        # Single-threaded: the files are small, and pyarrow's reader threads still alive at interpreter
        # exit can abort the process (apache/arrow#34314).
        table = pq.read_table(pa.BufferReader(raw), use_threads=False)
        if "group" not in table.column_names:  # written before the column existed
            table = table.append_column(pa.field("group", pa.int64(), nullable=False),
                                        pa.array(np.full(table.num_rows, -1, np.int64)))
        return table.cast(SCHEMA)
    except (pa.ArrowInvalid, ValueError) as exc:
        raise StoreError(f"unreadable sample index {store.location.child_url(*relative)}: {exc}") from exc


def samples_table(index: int, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Validate sample rows of shard ``index`` and build the Parquet table (sorted by row)."""
    if not _is_int(index) or index < 0:
        raise ConfigError(f"shard index must be an integer ≥ 0, got {index!r}")
    columns: dict[str, list[Any]] = {f.name: [] for f in SCHEMA}
    for i, rec in enumerate(rows):
        for key in ("row", "key", "shard"):
            if key not in rec:
                raise ConfigError(f"sample {i} of shard {index} misses {key!r} (needs row, key, shard)")
        if not _is_int(rec["row"]) or rec["row"] < 0:
            raise ConfigError(f"sample {i} of shard {index}: row must be an integer ≥ 0, got {rec['row']!r}")
        label = rec.get("label")
        label = -1 if label is None else label
        if not _is_int(label):
            raise ConfigError(f"sample {i} of shard {index}: label must be an integer or None, got {label!r}")
        group = -1 if rec.get("group") is None else rec["group"]
        if not _is_int(group):
            raise ConfigError(f"sample {i} of shard {index}: group must be an integer or None, got {group!r}")
        for key in ("key", "shard"):
            if not isinstance(rec[key], str):
                raise ConfigError(f"sample {i} of shard {index}: {key} must be a string, got {rec[key]!r}")
        for key in ("caption", "error"):
            if rec.get(key) is not None and not isinstance(rec[key], str):
                raise ConfigError(f"sample {i} of shard {index}: {key} must be a string or None, got {rec[key]!r}")
        columns["row"].append(int(rec["row"]))
        columns["key"].append(rec["key"])
        columns["shard"].append(rec["shard"])
        columns["shard_index"].append(int(index))
        columns["label"].append(int(label))
        columns["caption"].append(rec.get("caption"))
        columns["error"].append(rec.get("error"))
        columns["group"].append(int(group))
    table = pa.table(columns, schema=SCHEMA)
    if len(set(columns["row"])) != len(columns["row"]):
        raise ConfigError(f"sample rows of shard {index} must be distinct")
    return table.sort_by("row")


def write_samples_part(store: RunStore, index: int, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write (atomically replace) shard ``index``'s part of the sample index."""
    store._require_writable("write_samples_part")
    table = samples_table(index, rows)
    if table.num_rows and pc.max(table["row"]).as_py() >= store.n_rows:
        raise ConfigError(f"sample rows of shard {index} must be < n_rows={store.n_rows}")
    store.location.write_bytes_atomic(_table_bytes(table), SAMPLES_DIR, part_name(index))
    store.location.remove(MERGED_FILE)


def _concat_parts(store: RunStore) -> pa.Table:
    tables = []
    for name in store.location.list_names(SAMPLES_DIR):
        if name.startswith("part-") and name.endswith(".parquet"):
            table = _read_table(store, SAMPLES_DIR, name)
            if table is not None:
                tables.append(table)
    if not tables:
        return SCHEMA.empty_table()
    return pa.concat_tables(tables).sort_by("row")


def merge_samples(store: RunStore) -> pa.Table:
    """Concatenate all parts into ``samples.parquet`` sorted by row (same parts → same file)."""
    store._require_writable("merge_samples")
    table = _concat_parts(store)
    rows = table["row"].to_numpy()
    if rows.size and np.any(rows[1:] == rows[:-1]):
        dupes = np.unique(rows[1:][rows[1:] == rows[:-1]])[:5].tolist()
        raise StoreError(f"sample index of {store.url} has rows claimed by two shards, e.g. {dupes}")
    store.location.write_bytes_atomic(_table_bytes(table), MERGED_FILE)
    return table


def read_samples(store: RunStore) -> pa.Table:
    """The sample index: the merged file if present, else the parts concatenated and sorted by row."""
    merged = _read_table(store, MERGED_FILE)
    return merged if merged is not None else _concat_parts(store)
