"""``RunStore``: one zarr v3 group per run, written in chunk-aligned row blocks by many writers.

Layout (the public contract, see README, "The store"):

* group attributes: the caller's run description (config, model identity, code version, ``shards``…)
  plus ``clipscope_schema_version``, ``n_rows`` and ``rows_per_chunk``;
* per-sample arrays ``name[sample, …]`` chunked ``(rows_per_chunk, *tail)`` (or sharded with that shard
  shape and smaller inner chunks), attribute ``clipscope_per_sample: true``; ``valid[sample]`` bool;
* other arrays (``reductions/…``, ``second_order/layer_l/directions``) chunked by zarr's heuristic;
* every array has ``dimension_names``, fill value 0; ``manifest/``, ``samples/``, ``samples.parquet``
  and ``lock.json`` are plain files next to the arrays (see manifest.py, sample_index.py, lock.py).

A RunStore pickles to (url, storage_options, mode) and reopens lazily, so Ray can ship it to workers.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import zarr
from zarr.errors import ZarrUserWarning

from clipscope.errors import ConfigError, StoreError
from clipscope.storage.layout import (
    PER_SAMPLE_ATTR,
    SAMPLE_DIM,
    SCHEMA_ATTR,
    SCHEMA_VERSION,
    VALID_ARRAY,
    ArraySpec,
    _is_int,
    check_dims_consistent,
    schema_mismatch_message,
    validate_array_name,
    validate_dtype,
)
from clipscope.storage.location import Location

RESERVED_ATTRS = (SCHEMA_ATTR, "n_rows", "rows_per_chunk")
_MODES = ("r", "r+")

INCOMPLETE_ATTR = "clipscope_incomplete"
"""Set (true) on a result group or array while it is being written and dropped last: readers of the
store (``array_names``, ``array``, ``read_result``) do not see an array that carries it or that lies
under a group that carries it, so a writer killed at any point leaves the result complete or absent."""


@contextlib.contextmanager
def quiet_foreign_objects() -> Iterator[None]:
    """Silence zarr's warning about the store's non-zarr files (manifest/, samples.parquet, lock.json)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"Object at .* is not recognized as a component of a Zarr hierarchy",
            category=ZarrUserWarning,
        )
        yield


def _check_json(value: Any, what: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} must be JSON-serialisable (no numpy scalars, NaN or sets): {exc}") from exc


def _reopen(url: str, storage_options: dict[str, Any] | None, mode: str) -> RunStore:
    return RunStore(Location(url, storage_options), mode)


class RunStore:
    """A clipscope run store. Use :meth:`create` or :meth:`open`, not the constructor."""

    def __init__(self, location: Location, mode: str):
        if mode not in _MODES:
            raise ConfigError(f"mode must be one of {_MODES}, got {mode!r}")
        self._location = location
        self._mode = mode
        self._group_obj: zarr.Group | None = None
        self._attrs: dict[str, Any] | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._names: list[str] | None = None
        self._complete_groups: dict[str, bool] = {}
        self._done_rows: np.ndarray | None = None

    # --- construction -----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        url: str,
        *,
        arrays: Sequence[ArraySpec],
        n_rows: int,
        rows_per_chunk: int,
        attrs: Mapping[str, Any],
        storage_options: dict[str, Any] | None = None,
        rows_per_inner_chunk: int | None = None,
    ) -> RunStore:
        """Create a new run store; refuse if the location already holds anything but a lock file.

        ``rows_per_inner_chunk`` (a divisor of ``rows_per_chunk``) switches per-sample arrays to zarr
        sharding: one shard of ``rows_per_chunk`` rows is still the unit a writer owns, but a reader of
        one row fetches only an inner chunk.
        """
        location = Location(url, storage_options)
        if not _is_int(rows_per_chunk) or rows_per_chunk < 1:
            raise ConfigError(f"rows_per_chunk must be an integer ≥ 1, got {rows_per_chunk!r}")
        if not _is_int(n_rows) or n_rows < 0 or n_rows % rows_per_chunk:
            raise ConfigError(
                f"n_rows must be an integer ≥ 0 and a multiple of rows_per_chunk={rows_per_chunk} "
                f"(sum of plan_row_blocks capacities), got {n_rows!r}"
            )
        if rows_per_inner_chunk is not None and (
            not _is_int(rows_per_inner_chunk)
            or rows_per_inner_chunk < 1
            or rows_per_chunk % rows_per_inner_chunk
        ):
            raise ConfigError(
                f"rows_per_inner_chunk must be None or a divisor of rows_per_chunk={rows_per_chunk}, "
                f"got {rows_per_inner_chunk!r}"
            )
        specs = list(arrays)
        if any(not isinstance(s, ArraySpec) for s in specs):
            raise ConfigError("arrays must be a sequence of ArraySpec")
        names = [s.name for s in specs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"array names must be unique, got duplicates {dupes}")
        for name in names:
            for other in names:
                if other.startswith(name + "/"):
                    raise ConfigError(f"{name!r} cannot be both an array and the group of {other!r}")
        if not isinstance(attrs, Mapping):
            raise ConfigError(f"attrs must be a dict, got {type(attrs).__name__}")
        clash = [k for k in RESERVED_ATTRS if k in attrs]
        if clash:
            raise ConfigError(f"attrs may not set the reserved keys {clash}; the store sets them")
        full_attrs = {
            **dict(attrs),
            SCHEMA_ATTR: SCHEMA_VERSION,
            "n_rows": int(n_rows),
            "rows_per_chunk": int(rows_per_chunk),
        }
        _check_json(full_attrs, "attrs")
        n_rows, rows_per_chunk = int(n_rows), int(rows_per_chunk)
        check_dims_consistent(
            [(VALID_ARRAY, (SAMPLE_DIM,), (n_rows,))]
            + [(s.name, s.dims, s.shape(n_rows)) for s in specs]
        )

        existing = [n for n in location.list_names() if n != "lock.json"]
        if location.is_local_path and location.fs.isfile(location.root):
            raise StoreError(f"refusing to create a run store at {location.url}: it is a file")
        if existing:
            shown = ", ".join(existing[:5]) + (", …" if len(existing) > 5 else "")
            raise StoreError(
                f"refusing to create a run store at {location.url}: it exists and is not empty "
                f"(found {shown}); open it to resume, or choose a new location"
            )

        group = zarr.create_group(
            location.zarr_store(read_only=False), zarr_format=3, attributes=full_attrs
        )
        store = cls(location, "r+")
        store._group_obj = group
        store._attrs = full_attrs
        # ArraySpec refuses the reserved name, so the mask is described under a stand-in name.
        valid_spec = ArraySpec(name="_valid", dims=(SAMPLE_DIM,), shape_tail=(), dtype="bool")
        store._create_array(valid_spec, rows_per_inner_chunk, name=VALID_ARRAY)
        for spec in specs:
            store._create_array(spec, rows_per_inner_chunk)
        store._names = None
        return store

    @classmethod
    def open(
        cls, url: str, mode: str = "r", storage_options: dict[str, Any] | None = None
    ) -> RunStore:
        """Open an existing run store (``mode="r"`` read-only, ``"r+"`` to write rows and results)."""
        store = cls(Location(url, storage_options), mode)
        store._group()  # fail now, with a clear message, if it is missing or not a clipscope store
        return store

    def __reduce__(self):
        return (_reopen, (self._location.url, self._location.storage_options, self._mode))

    def __repr__(self) -> str:
        return f"RunStore({self._location.url!r}, mode={self._mode!r})"

    # --- properties -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._location.url

    @property
    def storage_options(self) -> dict[str, Any] | None:
        return self._location.storage_options

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def location(self) -> Location:
        return self._location

    def _cached_attrs(self) -> dict[str, Any]:
        if self._attrs is None:
            self._attrs = self._group().attrs.asdict()
        return self._attrs

    @property
    def attrs(self) -> dict[str, Any]:
        """Group attributes (a deep copy: editing it does not change the store, see update_attrs)."""
        return json.loads(json.dumps(self._cached_attrs()))

    @property
    def info(self):
        """The typed run metadata (``storage.schema.RunInfo``) of the group attributes."""
        from clipscope.storage.schema import RunInfo

        return RunInfo.from_attrs(self._cached_attrs())

    @property
    def n_rows(self) -> int:
        return int(self._cached_attrs()["n_rows"])

    @property
    def rows_per_chunk(self) -> int:
        return int(self._cached_attrs()["rows_per_chunk"])

    def array_names(self, *, per_sample: bool | None = None) -> list[str]:
        """Sorted paths of the arrays in the store (``valid`` included); filter by per-sample-ness."""
        if self._names is None:
            with quiet_foreign_objects():
                members = list(self._group().members(max_depth=None))
            hidden = [name for name, node in members if node.attrs.get(INCOMPLETE_ATTR)]
            self._names = sorted(
                name for name, node in members
                if isinstance(node, zarr.Array)
                and not any(name == h or name.startswith(h + "/") for h in hidden)
            )
        if per_sample is None:
            return list(self._names)
        return [n for n in self._names if self.is_per_sample(n) == per_sample]

    def is_per_sample(self, name: str) -> bool:
        return bool(self.array(name).attrs.get(PER_SAMPLE_ATTR, False))

    def array(self, name: str) -> zarr.Array:
        """The zarr array at ``name`` (e.g. ``"direct/heads"``)."""
        if name not in self._arrays:
            try:
                with quiet_foreign_objects():
                    node = self._group()[name]
            except KeyError:
                node = None
            if not isinstance(node, zarr.Array) or self._is_hidden(name, node):
                known = ", ".join(self.array_names())
                raise StoreError(f"no array {name!r} in run store {self.url} (arrays: {known})")
            self._arrays[name] = node
        return self._arrays[name]

    def _is_hidden(self, name: str, node: zarr.Array) -> bool:
        """True while ``name`` or a group above it is being written (or its group is gone)."""
        if node.attrs.get(INCOMPLETE_ATTR):
            return True
        parts = name.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            path = "/".join(parts[:depth])
            if path not in self._complete_groups:
                try:
                    with quiet_foreign_objects():
                        group = self._group()[path]
                except KeyError:
                    return True  # an array left behind by a deleted group
                self._complete_groups[path] = isinstance(group, zarr.Group) and not group.attrs.get(INCOMPLETE_ATTR)
            if not self._complete_groups[path]:
                return True
        return False

    def _forget(self) -> None:
        """Drop the cached listing, nodes and group states (after a writer changed the tree)."""
        self._names = None
        self._arrays.clear()
        self._complete_groups.clear()

    def dims(self, name: str) -> tuple[str, ...]:
        """Dimension names of an array."""
        return tuple(self.array(name).metadata.dimension_names or ())

    def spec(self, name: str) -> ArraySpec:
        """The ArraySpec an array was created from (shape_tail after ``sample`` for per-sample arrays)."""
        if name == VALID_ARRAY:
            raise StoreError(f"{VALID_ARRAY!r} is the store's row mask, it has no ArraySpec")
        arr = self.array(name)
        per_sample = self.is_per_sample(name)
        return ArraySpec(
            name=name,
            dims=self.dims(name),
            shape_tail=tuple(arr.shape[1:] if per_sample else arr.shape),
            dtype=str(arr.dtype),
            per_sample=per_sample,
        )

    # --- internals --------------------------------------------------------------------------------

    def _group(self) -> zarr.Group:
        if self._group_obj is None:
            self._group_obj = self._open_group()
        return self._group_obj

    def _open_group(self) -> zarr.Group:
        loc = self._location
        raw = loc.read_bytes("zarr.json")
        if raw is None:
            what = "does not exist" if not loc.exists() else "has no zarr.json"
            raise StoreError(f"no run store at {loc.url}: the location {what}")
        try:
            meta = json.loads(raw)
        except ValueError as exc:
            raise StoreError(f"{loc.child_url('zarr.json')} is not valid JSON: {exc}") from exc
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
            raise StoreError(
                f"{loc.url} is not a clipscope run store: expected a zarr v3 group, found "
                f"zarr_format={meta.get('zarr_format')!r} node_type={meta.get('node_type')!r}"
            )
        version = (meta.get("attributes") or {}).get(SCHEMA_ATTR)
        if version is None:
            raise StoreError(
                f"{loc.url} is a zarr group but not a clipscope run store (no {SCHEMA_ATTR} attribute)"
            )
        if version != SCHEMA_VERSION:
            raise StoreError(schema_mismatch_message(loc.url, version))
        store = loc.zarr_store(read_only=self._mode == "r")
        return zarr.open_group(store, mode=self._mode, zarr_format=3)

    def _require_writable(self, what: str) -> None:
        if self._mode != "r+":
            raise StoreError(f"{what} needs the run store opened with mode='r+', {self.url} is read-only")

    def _create_array(self, spec: ArraySpec, rows_per_inner_chunk: int | None, name: str | None = None) -> None:
        shape = spec.shape(self.n_rows)
        kwargs: dict[str, Any] = {}
        if spec.per_sample:
            block = (self.rows_per_chunk, *(max(1, s) for s in spec.shape_tail))
            if spec.inner_chunk_tail is not None:  # shards of whole row chunks, inner chunks along the tail
                inner = spec.inner_chunk_tail
                kwargs["shards"] = (block[0], *(-(-b // c) * c for b, c in zip(block[1:], inner)))
                kwargs["chunks"] = (rows_per_inner_chunk or block[0], *inner)
            elif rows_per_inner_chunk is None:
                kwargs["chunks"] = block
            else:
                kwargs["shards"] = block
                kwargs["chunks"] = (rows_per_inner_chunk, *block[1:])
        self._group().create_array(
            name or spec.name,
            shape=shape,
            dtype=spec.dtype,
            fill_value=0,
            dimension_names=spec.dims,
            attributes={PER_SAMPLE_ATTR: spec.per_sample},
            **kwargs,
        )

    def _remember(self, name: str) -> None:
        """Add a newly created array to the cached listing (relisting a remote tree is slow)."""
        if self._names is not None and name not in self._names:
            self._names = sorted([*self._names, name])

    def _all_dims(self, exclude: str | None = None) -> list[tuple[str, tuple[str, ...], tuple[int, ...]]]:
        return [
            (n, self.dims(n), tuple(self.array(n).shape)) for n in self.array_names() if n != exclude
        ]

    # --- schema changes ---------------------------------------------------------------------------

    def add_arrays(self, specs: Sequence[ArraySpec], *, rows_per_inner_chunk: int | None = None) -> None:
        """Add arrays to an existing store (e.g. a later job's per-sample outputs).

        An array that already exists with the same spec is left alone, so a resumed job can call this
        again; one with a different spec is an error.
        """
        self._require_writable("add_arrays")
        new: list[ArraySpec] = []
        existing = set(self.array_names())
        for spec in specs:
            if not isinstance(spec, ArraySpec):
                raise ConfigError(f"add_arrays takes ArraySpec objects, got {type(spec).__name__}")
            if spec.name in existing:
                have = self.spec(spec.name)
                if have != spec:
                    raise StoreError(
                        f"array {spec.name!r} already exists in {self.url} as {have}, not {spec}"
                    )
                continue
            new.append(spec)
        check_dims_consistent([(s.name, s.dims, s.shape(self.n_rows)) for s in new] + self._all_dims())
        for spec in new:
            self._create_array(spec, rows_per_inner_chunk)
            self._remember(spec.name)

    def update_attrs(self, attrs: Mapping[str, Any]) -> None:
        """Merge keys into the group attributes (the reserved layout keys cannot change)."""
        self._require_writable("update_attrs")
        clash = [k for k in RESERVED_ATTRS if k in attrs]
        if clash:
            raise ConfigError(f"update_attrs may not change the reserved keys {clash}")
        _check_json(dict(attrs), "attrs")
        group = self._group()
        group.update_attributes(dict(attrs))
        self._attrs = group.attrs.asdict()

    def grow(self, n_rows: int, attrs: Mapping[str, Any]) -> None:
        """Extend the ``sample`` axis of every per-sample array (and ``valid``) to ``n_rows`` rows and
        merge ``attrs`` into the group attributes: a store gaining shards. New rows are zeros and not
        valid. The arrays are resized first and the attributes written last, so a writer killed in
        between leaves the old attributes, and the next ``grow`` repeats the (idempotent) resizes.
        """
        self._require_writable("grow")
        rpc, current = self.rows_per_chunk, self.n_rows
        if not _is_int(n_rows) or n_rows < current or n_rows % rpc:
            raise ConfigError(f"a store grows to a multiple of rows_per_chunk={rpc} rows ≥ its {current}, "
                              f"got {n_rows!r}")
        clash = [k for k in RESERVED_ATTRS if k in attrs]
        if clash:
            raise ConfigError(f"grow may not set the reserved keys {clash}")
        _check_json(dict(attrs), "attrs")
        for name in sorted(set(self.array_names(per_sample=True)) | {VALID_ARRAY}):
            arr = self.array(name)
            if arr.shape[0] != n_rows:
                arr.resize((int(n_rows), *arr.shape[1:]))
        self._arrays.clear()
        group = self._group()
        group.update_attributes({**dict(attrs), "n_rows": int(n_rows)})
        self._attrs = group.attrs.asdict()

    # --- rows ---------------------------------------------------------------------------------------

    def write_rows(
        self, start: int, arrays: Mapping[str, np.ndarray], valid: np.ndarray | None
    ) -> None:
        """Write rows [start, start + n) of per-sample arrays and of ``valid``.

        ``start`` and ``n`` must be multiples of ``rows_per_chunk`` (pad a shard's rows with zeros and
        ``valid=False``) so that a writer only ever replaces whole chunks it owns. Writing the same
        data again stores the same bytes. ``valid=None`` leaves the mask alone (a later job adding
        its own arrays to rows an earlier job validated).
        """
        self._require_writable("write_rows")
        rpc, n_rows = self.rows_per_chunk, self.n_rows
        if not _is_int(start) or start < 0 or start % rpc:
            raise StoreError(
                f"write_rows start must be a multiple of rows_per_chunk={rpc} (≥ 0), got {start!r}"
            )
        if not arrays and valid is None:
            raise ConfigError("write_rows needs at least one array or valid")
        lengths = {name: np.shape(data)[0] if np.ndim(data) else None for name, data in arrays.items()}
        if valid is not None:
            valid = np.asarray(valid)
            if valid.ndim != 1 or valid.dtype != np.bool_:
                raise StoreError(
                    f"valid must be a 1-d bool array, got dtype {valid.dtype} shape {valid.shape}"
                )
            lengths[VALID_ARRAY] = valid.shape[0]
        n = next(iter(lengths.values()))
        if any(length != n for length in lengths.values()):
            raise StoreError(f"write_rows arrays must have the same number of rows, got {lengths}")
        if n % rpc:
            raise StoreError(
                f"write_rows must write whole chunks: rows must be a multiple of rows_per_chunk={rpc}, "
                f"got {n} (pad with zeros and valid=False)"
            )
        if start + n > n_rows:
            raise StoreError(f"write_rows rows [{start}, {start + n}) exceed the store's n_rows={n_rows}")
        prepared: list[tuple[zarr.Array, np.ndarray]] = []
        for name, data in arrays.items():
            if name == VALID_ARRAY:
                raise ConfigError("pass the validity mask as write_rows(..., valid=…), not in arrays")
            if not self.is_per_sample(name):
                raise StoreError(f"{name!r} is not a per-sample array; use write_result for it")
            arr = self.array(name)
            data = np.asarray(data)
            expected = (n, *arr.shape[1:])
            if data.shape != expected:
                raise StoreError(f"rows for {name!r} must have shape {expected}, got {data.shape}")
            if not np.can_cast(data.dtype, arr.dtype, casting="same_kind"):
                raise StoreError(f"rows for {name!r} must be castable to {arr.dtype}, got {data.dtype}")
            prepared.append((arr, data.astype(arr.dtype, copy=False)))
        if n == 0:
            return
        rows = slice(start, start + n)
        for arr, data in prepared:
            arr[rows] = data
        if valid is not None:
            self.array(VALID_ARRAY)[rows] = valid

    def read(self, name: str, rows: slice | np.ndarray | Sequence[int] | int | None = None) -> np.ndarray:
        """Rows of an array: all (None), a slice, one row (int), or row numbers / a bool mask (in order)."""
        arr = self.array(name)
        if rows is None:
            return np.asarray(arr[...])
        if isinstance(rows, slice) or _is_int(rows):
            return np.asarray(arr[rows])
        index = np.asarray(rows)
        n = arr.shape[0]
        if index.dtype == np.bool_:
            if index.shape != (n,):
                raise StoreError(f"a bool row mask for {name!r} must have shape ({n},), got {index.shape}")
            index = np.flatnonzero(index)
        if index.ndim != 1 or (index.size and index.dtype.kind not in "iu"):
            raise StoreError(f"rows must be a 1-d array of row numbers, got {index.dtype} {index.shape}")
        index = index.astype(np.int64)
        if index.size and (index.min() < -n or index.max() >= n):
            raise StoreError(f"row numbers for {name!r} must lie in [0, {n}), got {index.min()}…{index.max()}")
        index = np.where(index < 0, index + n, index)
        if index.size == 0:
            return np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
        unique, inverse = np.unique(index, return_inverse=True)
        return np.asarray(arr.oindex[unique])[inverse]

    def read_valid(
        self, rows: slice | np.ndarray | Sequence[int] | None = None, *, done_only: bool = True
    ) -> np.ndarray:
        """The ``valid[sample]`` mask (or part of it): rows that hold a decoded sample.

        In an extracted store (one with the ``row_blocks`` attribute) a row counts only once its
        shard's done record exists, so rows of a failed or unfinished shard are never read as valid;
        ``done_only=False`` returns the raw mask as the writers left it.
        """
        valid = self.read(VALID_ARRAY, rows)
        if not done_only:
            return valid
        done = self.done_rows()
        if done is None:
            return valid
        if rows is None:
            return valid & done
        if isinstance(rows, slice) or _is_int(rows):
            return valid & done[rows]
        index = np.asarray(rows)
        if index.dtype == np.bool_:
            index = np.flatnonzero(index)
        return valid & done[index.astype(np.int64)]

    def done_rows(self) -> np.ndarray | None:
        """[sample] bool: the rows owned by shards with a done extract record; None for a store whose
        rows are not planned per shard (no ``row_blocks`` attribute). Cached; see ``forget_done_rows``."""
        if self._done_rows is None:
            blocks = self._cached_attrs().get("row_blocks")
            if not blocks:
                return None
            from clipscope.storage.manifest import done_indices

            done = np.zeros(self.n_rows, bool)
            for index in done_indices(self):
                if 0 <= index < len(blocks):
                    start, capacity = blocks[index]
                    done[start:start + capacity] = True
            self._done_rows = done
        return self._done_rows

    def forget_done_rows(self) -> None:
        """Re-read the done records on the next ``done_rows``/``read_valid`` (another writer finished shards)."""
        self._done_rows = None

    # --- results ------------------------------------------------------------------------------------

    def _check_result(self, name: str, data: np.ndarray, dims: Sequence[str] | None,
                      attrs: Mapping[str, Any] | None) -> tuple[np.ndarray, np.dtype, tuple[str, ...], dict]:
        """Validate one result array; returns (data, dtype, dims, attrs with the per-sample flag)."""
        validate_array_name(name)
        if name == VALID_ARRAY:
            raise ConfigError(f"{VALID_ARRAY!r} is written by write_rows")
        data = np.asarray(data)
        dtype = validate_dtype(data.dtype, name)
        user_attrs = dict(attrs or {})
        for key in (PER_SAMPLE_ATTR, INCOMPLETE_ATTR):
            if key in user_attrs:
                raise ConfigError(f"attrs may not set the reserved key {key!r}")
        _check_json(user_attrs, f"attrs of {name!r}")
        if dims is None:
            if name not in self.array_names():
                raise ConfigError(f"dims are required to create the result array {name!r}")
            dims = self.dims(name)
        dims = tuple(dims)
        if len(dims) != data.ndim or len(set(dims)) != len(dims) or not all(
            isinstance(d, str) and d for d in dims
        ):
            raise ConfigError(
                f"dims of {name!r} must be {data.ndim} distinct names for shape {data.shape}, got {dims!r}"
            )
        return data, dtype, dims, {PER_SAMPLE_ATTR: False, **user_attrs}

    def _put_result(self, parent: zarr.Group, leaf: str, data: np.ndarray, dtype: np.dtype,
                    dims: tuple[str, ...], attrs: dict) -> None:
        """(Re)create an array flagged incomplete, write its data, then drop the flag (its attrs last)."""
        arr = parent.create_array(
            leaf, shape=data.shape, dtype=dtype, fill_value=0, dimension_names=dims,
            attributes={**attrs, INCOMPLETE_ATTR: True}, overwrite=True,
        )
        arr[...] = data
        arr.attrs.put(attrs)

    def write_result(
        self,
        name: str,
        data: np.ndarray,
        dims: Sequence[str] | None = None,
        attrs: Mapping[str, Any] | None = None,
        overwrite: bool = True,
    ) -> None:
        """Write a whole non-per-sample array (``reductions/…``, ``…/directions``) with named dims.

        ``dims`` may be omitted when the array exists. An existing array is replaced
        (``overwrite=False`` refuses). The array is created flagged incomplete and the flag is
        dropped after its data is written, so readers see the old array, none, or the new one
        whole — never a half-written one. Results that belong together are written with
        :meth:`write_result_group`.
        """
        self._require_writable("write_result")
        data, dtype, dims, full_attrs = self._check_result(name, data, dims, attrs)
        with quiet_foreign_objects():
            try:
                node = self._group()[name]
            except KeyError:
                node = None
        if node is not None:
            if isinstance(node, zarr.Array) and node.attrs.get(PER_SAMPLE_ATTR):
                raise StoreError(f"{name!r} is a per-sample array; write it with write_rows")
            if not overwrite and name in self.array_names():
                raise StoreError(f"result {name!r} already exists in {self.url}; pass overwrite=True")
        for other in self.array_names():
            if other.startswith(name + "/") or name.startswith(other + "/"):
                raise StoreError(f"{name!r} clashes with the existing array {other!r}")
        check_dims_consistent([(name, dims, data.shape)] + self._all_dims(exclude=name))
        parent_path, _, leaf = name.rpartition("/")
        root = self._group()
        parent = root.require_group(parent_path) if parent_path else root
        self._arrays.pop(name, None)
        self._put_result(parent, leaf, data, dtype, dims, full_attrs)
        self._remember(name)

    def write_result_group(
        self,
        group: str,
        arrays: Mapping[str, tuple[np.ndarray, Sequence[str]] | tuple[np.ndarray, Sequence[str], Mapping[str, Any]]],
        attrs: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """Replace the result group ``group`` by ``arrays`` ({leaf: (data, dims[, array attrs])}) as one unit.

        The group is flagged incomplete (an existing one first, then it is deleted and created again
        with the flag), its arrays are written, and the flag is replaced by ``attrs`` last. A writer
        killed at any point leaves a group that readers do not see; the next write replaces it.
        Returns the arrays' full names.
        """
        self._require_writable("write_result_group")
        validate_array_name(group)
        group_attrs = dict(attrs or {})
        if INCOMPLETE_ATTR in group_attrs:
            raise ConfigError(f"attrs may not set the reserved key {INCOMPLETE_ATTR!r}")
        _check_json(group_attrs, f"attrs of {group!r}")
        if not arrays:
            raise ConfigError(f"write_result_group({group!r}) needs at least one array")
        checked: dict[str, tuple[np.ndarray, np.dtype, tuple[str, ...], dict]] = {}
        for leaf, spec in arrays.items():
            if not isinstance(leaf, str) or "/" in leaf:
                raise ConfigError(f"arrays of a result group are named by one path segment, got {leaf!r}")
            data, dims, *rest = spec
            checked[leaf] = self._check_result(f"{group}/{leaf}", data, dims, rest[0] if rest else None)
        inside = [n for n in self.array_names() if n.startswith(group + "/")]
        if any(self.is_per_sample(n) for n in inside) or group in self.array_names():
            raise StoreError(f"{group!r} holds per-sample arrays or is an array; it is not a result group")
        outside = [entry for entry in self._all_dims() if not entry[0].startswith(group + "/")]
        check_dims_consistent([(f"{group}/{leaf}", dims, data.shape)
                               for leaf, (data, _, dims, _) in checked.items()] + outside)
        root = self._group()
        self._discard_group(group)
        node = root.create_group(group, attributes={INCOMPLETE_ATTR: True}, overwrite=True)
        self._forget()
        for leaf, (data, dtype, dims, full_attrs) in checked.items():
            self._put_result(node, leaf, data, dtype, dims, full_attrs)
        node.attrs.put(group_attrs)
        self._forget()
        return [f"{group}/{leaf}" for leaf in checked]

    def _discard_group(self, group: str) -> None:
        """Flag an existing group incomplete, then delete it (a kill in between leaves it hidden)."""
        root = self._group()
        with quiet_foreign_objects():
            try:
                node = root[group]
            except KeyError:
                node = None
        if node is None:
            # A kill during an earlier delete may have left arrays without their group's zarr.json.
            if self._location.exists(group):
                self._location.fs.rm(self._location.path(group), recursive=True)
            return
        if isinstance(node, zarr.Group):
            node.update_attributes({INCOMPLETE_ATTR: True})
        parent_path, _, leaf = group.rpartition("/")
        parent = root[parent_path] if parent_path else root
        del parent[leaf]
        self._forget()

    def result_group_attrs(self, group: str) -> dict[str, Any] | None:
        """Attributes of a complete result group, or None when it is absent or incomplete."""
        with quiet_foreign_objects():
            try:
                node = self._group()[group]
            except KeyError:
                return None
        if not isinstance(node, zarr.Group) or node.attrs.get(INCOMPLETE_ATTR):
            return None
        parts = group.split("/")
        for depth in range(1, len(parts)):
            with quiet_foreign_objects():
                try:
                    parent = self._group()["/".join(parts[:depth])]
                except KeyError:
                    return None
            if parent.attrs.get(INCOMPLETE_ATTR):
                return None
        return node.attrs.asdict()

    def delete_results(self, group: str) -> list[str]:
        """Remove every result array under ``group`` (the group itself too); per-sample arrays are
        never removed. The group is flagged incomplete before it is deleted. Returns the removed names."""
        self._require_writable("delete_results")
        validate_array_name(group)
        doomed = [n for n in self.array_names() if n == group or n.startswith(group + "/")]
        kept = [n for n in doomed if self.is_per_sample(n)]
        if kept:
            raise StoreError(f"delete_results({group!r}) would remove per-sample arrays {kept[:3]}")
        if group in doomed:  # a single array
            parent_path, _, leaf = group.rpartition("/")
            node = self._group()[parent_path] if parent_path else self._group()
            self._group()[group].attrs.update({INCOMPLETE_ATTR: True})
            del node[leaf]
            self._forget()
        else:
            self._discard_group(group)
        self._forget()
        return doomed

    def read_result(self, name: str) -> np.ndarray:
        """A whole non-per-sample array."""
        return np.asarray(self.array(name)[...])

    # --- manifest and sample index (see manifest.py, sample_index.py) -------------------------------

    def mark_shard_done(self, index: int, record: Mapping[str, Any], *, stage: str = "extract") -> None:
        from clipscope.storage.manifest import mark_shard_done

        mark_shard_done(self, index, record, stage=stage)
        self._done_rows = None

    def mark_shard_failed(self, index: int, record: Mapping[str, Any], *, stage: str = "extract") -> None:
        from clipscope.storage.manifest import mark_shard_failed

        mark_shard_failed(self, index, record, stage=stage)
        self._done_rows = None

    def shard_records(self, *, stage: str = "extract") -> dict[int, dict[str, Any]]:
        from clipscope.storage.manifest import shard_records

        return shard_records(self, stage=stage)

    def clear_shard(self, index: int, *, stage: str = "extract") -> None:
        from clipscope.storage.manifest import clear_shard

        clear_shard(self, index, stage=stage)
        self._done_rows = None

    def rows_checksum(self, start: int, capacity: int, names: Sequence[str] | None = None) -> str:
        from clipscope.storage.manifest import rows_checksum

        return rows_checksum(self, start, capacity, names=names)

    def write_samples_part(self, index: int, rows: Sequence[Mapping[str, Any]]) -> None:
        from clipscope.storage.sample_index import write_samples_part

        write_samples_part(self, index, rows)

    def merge_samples(self):
        from clipscope.storage.sample_index import merge_samples

        return merge_samples(self)

    def read_samples(self):
        from clipscope.storage.sample_index import read_samples

        return read_samples(self)
