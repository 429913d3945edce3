"""The shape of a run store: array specifications, row blocks per shard, dimension-name rules.

Pure bookkeeping, no I/O. The rules here are what make the store a public contract:

* every array names its dimensions; per-sample arrays have ``sample`` first and are chunked
  ``(rows_per_chunk, *tail)`` so that a shard, owning whole chunks, never shares one with another writer;
* a dimension name has one length within a group and all of that group's ancestors (that is what
  ``xarray.open_zarr(group=…)`` and ``xarray.open_datatree`` require); sibling groups may differ
  (``second_order/layer_3/…`` and ``second_order/layer_5/…`` have different ``later_layer`` lengths).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from clipscope.errors import ConfigError

SCHEMA_VERSION = 2
"""Version of the store layout written into the group attribute ``clipscope_schema_version``."""

SCHEMA_CHANGES = {
    2: "the `split` ln_post convention of direct/* and second_order/*/shared became the reference code's, "
       "term for term",
}
"""Why each version broke the one before: readers name it when they refuse an older store."""


def schema_mismatch_message(url: str, version: object) -> str:
    """The one-line refusal of a store written under another schema version, saying how to re-extract."""
    if _is_int(version) and version < SCHEMA_VERSION:
        later = range(int(version) + 1, SCHEMA_VERSION + 1)
        changes = "; ".join(SCHEMA_CHANGES[v] for v in later if v in SCHEMA_CHANGES)
        why = f" (since then {changes})" if changes else ""
        return (f"{url} has store schema version {version}, this clipscope reads version {SCHEMA_VERSION}{why}: "
                f"re-extract it by running `clipscope extract` again with the same inputs into a new --out store")
    return (f"{url} has store schema version {version!r}, this clipscope reads version {SCHEMA_VERSION}: "
            f"it was written by another clipscope; read it with that version or re-extract with `clipscope extract`")


SCHEMA_ATTR = "clipscope_schema_version"
PER_SAMPLE_ATTR = "clipscope_per_sample"
VALID_ARRAY = "valid"
SAMPLE_DIM = "sample"

MEMBERS_DIR = "members"
"""``members/part-{index:06d}.parquet``: per shard, where each tar member's bytes lie (key, suffix, offset, size),
so a reader fetches one sample's image by key without scanning the tar (``pipelines/data/member_index.py``)."""

# Names of non-zarr things at the store root; no array or group may take them.
RESERVED_NAMES = frozenset({"manifest", "samples", "samples.parquet", "lock.json", "zarr.json", MEMBERS_DIR})

_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def validate_array_name(name: str) -> str:
    """Return ``name`` if it is a valid store path such as ``direct/heads``; raise ConfigError otherwise."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"array name must be a non-empty string like 'direct/heads', got {name!r}")
    segments = name.split("/")
    if any(not _SEGMENT.match(seg) for seg in segments):
        raise ConfigError(
            f"array name must be '/'-separated segments of letters, digits, '_', '.', '-' "
            f"(not starting with '.' or '-'), got {name!r}"
        )
    if segments[0] in RESERVED_NAMES:
        raise ConfigError(f"array name {name!r} uses the reserved top-level name {segments[0]!r}")
    return name


def group_of(name: str) -> str:
    """Parent group path of an array ('' for the root)."""
    return posixpath.dirname(name)


@dataclass(frozen=True)
class ArraySpec:
    """One array of the store.

    ``shape_tail`` is the shape after the sample axis for per-sample arrays (whose full shape is
    ``(n_rows, *shape_tail)``), or the full shape when ``per_sample`` is False.
    """

    name: str  # e.g. "direct/heads"
    dims: tuple[str, ...]  # e.g. ("sample", "layer", "head", "embed")
    shape_tail: tuple[int, ...]
    dtype: str
    per_sample: bool = True
    # zarr sharding inside a row chunk — one shard per row chunk (the unit a writer owns), inner
    # chunks of this tail shape (e.g. 256 units of a map layer), so a reader of a few units decodes only theirs
    inner_chunk_tail: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        validate_array_name(self.name)
        if self.inner_chunk_tail is not None:
            inner = tuple(self.inner_chunk_tail)
            if len(inner) != len(tuple(self.shape_tail)) or any(not _is_int(c) or c < 1 for c in inner):
                raise ConfigError(f"inner_chunk_tail of {self.name!r} must be one integer ≥ 1 per shape_tail "
                                  f"entry {tuple(self.shape_tail)!r}, got {inner!r}")
            object.__setattr__(self, "inner_chunk_tail", tuple(int(c) for c in inner))
        if self.name == VALID_ARRAY:
            raise ConfigError(f"array name {VALID_ARRAY!r} is reserved for the row validity mask")
        dims = tuple(self.dims)
        tail = tuple(self.shape_tail)
        object.__setattr__(self, "dims", dims)
        object.__setattr__(self, "shape_tail", tail)
        if any(not isinstance(d, str) or not d for d in dims):
            raise ConfigError(f"dims of {self.name!r} must be non-empty strings, got {dims!r}")
        if len(set(dims)) != len(dims):
            raise ConfigError(f"dims of {self.name!r} must be distinct, got {dims!r}")
        if any(not _is_int(s) or s < 0 for s in tail):
            raise ConfigError(f"shape_tail of {self.name!r} must be integers ≥ 0, got {tail!r}")
        object.__setattr__(self, "shape_tail", tuple(int(s) for s in tail))
        expected = len(tail) + (1 if self.per_sample else 0)
        if len(dims) != expected:
            raise ConfigError(
                f"{self.name!r} needs {expected} dims for shape_tail {tail!r}"
                f"{' plus the sample axis' if self.per_sample else ''}, got {len(dims)}: {dims!r}"
            )
        if self.per_sample and dims[0] != SAMPLE_DIM:
            raise ConfigError(
                f"per-sample array {self.name!r} must have {SAMPLE_DIM!r} as first dim, got {dims[0]!r}"
            )
        if self.per_sample and SAMPLE_DIM in dims[1:]:
            raise ConfigError(f"{self.name!r} may name {SAMPLE_DIM!r} only once, got {dims!r}")
        object.__setattr__(self, "dtype", str(validate_dtype(self.dtype, self.name)))

    def shape(self, n_rows: int) -> tuple[int, ...]:
        """Full array shape in a store of ``n_rows`` rows."""
        return (n_rows, *self.shape_tail) if self.per_sample else self.shape_tail


def validate_dtype(dtype: object, name: str) -> np.dtype:
    """A numeric or bool numpy dtype (zarr v3 core types); ConfigError otherwise."""
    try:
        dt = np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError as exc:
        raise ConfigError(f"dtype of {name!r} must be a numpy dtype name, got {dtype!r}") from exc
    if dt.kind not in "biufc":
        raise ConfigError(f"dtype of {name!r} must be bool, integer, float or complex, got {dt}")
    return dt.newbyteorder("=")


@dataclass(frozen=True)
class RowBlock:
    """Rows [start, start + capacity) owned by shard ``index``; the first ``count`` hold its samples."""

    index: int
    start: int
    capacity: int
    count: int

    @property
    def stop(self) -> int:
        return self.start + self.capacity

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)


def plan_row_blocks(counts: Sequence[int], rows_per_chunk: int) -> list[RowBlock]:
    """Give shard i the chunk-aligned rows [start_i, start_i + cap_i), cap_i = count_i rounded up.

    An empty shard gets capacity 0 (no chunk). Blocks are contiguous in shard order, so the store
    has ``sum(capacities)`` rows.
    """
    if not _is_int(rows_per_chunk) or rows_per_chunk < 1:
        raise ConfigError(f"rows_per_chunk must be an integer ≥ 1, got {rows_per_chunk!r}")
    blocks: list[RowBlock] = []
    start = 0
    for index, count in enumerate(counts):
        if not _is_int(count) or count < 0:
            raise ConfigError(f"sample count of shard {index} must be an integer ≥ 0, got {count!r}")
        capacity = -(-int(count) // rows_per_chunk) * rows_per_chunk
        blocks.append(RowBlock(index=index, start=start, capacity=capacity, count=int(count)))
        start += capacity
    return blocks


def total_rows(blocks: Iterable[RowBlock]) -> int:
    """Number of rows a store needs for these blocks."""
    return sum(b.capacity for b in blocks)


def row_slices(n_rows: int, rows_per_block: int) -> list[slice]:
    """Consecutive slices of at most ``rows_per_block`` rows covering [0, n_rows), for block-wise reads."""
    if not _is_int(rows_per_block) or rows_per_block < 1:
        raise ConfigError(f"rows_per_block must be an integer ≥ 1, got {rows_per_block!r}")
    return [slice(s, min(s + rows_per_block, n_rows)) for s in range(0, n_rows, rows_per_block)]


def _ancestor_or_self(group: str, other: str) -> bool:
    return group == other or group == "" or other.startswith(group + "/")


def check_dims_consistent(arrays: Sequence[tuple[str, tuple[str, ...], tuple[int, ...]]]) -> None:
    """Raise ConfigError if a dimension name has two lengths in one group or along its ancestors.

    ``arrays`` holds (name, dims, shape) triples.
    """
    for i, (name_a, dims_a, shape_a) in enumerate(arrays):
        group_a = group_of(name_a)
        for name_b, dims_b, shape_b in arrays[i + 1 :]:
            group_b = group_of(name_b)
            if not (_ancestor_or_self(group_a, group_b) or _ancestor_or_self(group_b, group_a)):
                continue
            sizes_b = dict(zip(dims_b, shape_b))
            for dim, size in zip(dims_a, shape_a):
                if dim in sizes_b and sizes_b[dim] != size:
                    raise ConfigError(
                        f"dimension {dim!r} has length {size} in {name_a!r} but {sizes_b[dim]} in "
                        f"{name_b!r}; a dim name must have one length within a group and its "
                        "ancestors (xarray needs it) — rename one of them"
                    )
