"""Read side of a run store: find rows, rank them, read one image's tensors, export selections.

No models here; text-direction queries are built on top of these (score rows, then ``topk_rows``).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipscope.errors import ConfigError, StoreError
from clipscope.storage.layout import SAMPLE_DIM, _is_int
from clipscope.storage import schema
from clipscope.storage.location import Location
from clipscope.storage.sample_index import read_samples
from clipscope.storage.store import RunStore, quiet_foreign_objects

IMAGE_ARRAYS_PREFIX = "direct/"
EMBEDDING_ARRAY = schema.IMAGE_EMBEDDING.path()


def open_run(url: str, storage_options: dict[str, Any] | None = None) -> RunStore:
    """Open a run store read-only."""
    return RunStore.open(url, mode="r", storage_options=storage_options)


def open_xarray(url: str, group: str = "", storage_options: dict[str, Any] | None = None, *,
                valid_only: bool = True, coords: bool = True):
    """``xarray.Dataset`` of one group of a store (``""`` root, ``"direct"``, ``"second_order/layer_3"``…).

    Over ``xarray.open_zarr`` (lazy, dask-backed) it passes storage options, silences zarr's warning
    about the store's non-zarr files, and

    * ``coords``: labels every indexed dim — ``sample`` by row number with a ``key`` coordinate (the
      webdataset key, "" for padding rows), ``layer`` / ``token_layer`` / ``later_layer`` by their real
      0-based layer numbers (from the store's ``layers`` attribute), and ``head``, ``neuron``,
      ``token``, ``embed``… by 0…n−1;
    * ``valid_only``: keeps only the rows that hold a decoded sample (``valid``), dropping padding
      rows (each shard's rows are rounded up to whole chunks) and undecodable images.

    The store keeps no consolidated metadata (results are added by later jobs, so it would go stale):
    plain ``xarray.open_zarr`` needs ``consolidated=False``, else it warns and falls back. xarray is an
    optional dependency.
    """
    import xarray as xr

    location = Location(url, storage_options)
    with quiet_foreign_objects():
        ds = xr.open_zarr(
            location.url,
            group=group or None,
            consolidated=False,
            zarr_format=3,
            storage_options=location.storage_options,
        )
    if not (coords or valid_only) or not ds.sizes:
        return ds
    store = RunStore.open(url, mode="r", storage_options=storage_options)
    if coords:
        ds = ds.assign_coords(_xarray_coords(store, group, dict(ds.sizes)))
        names = [tuple(v.attrs.get("ablations") or ()) for v in ds.data_vars.values() if "ablation" in v.dims]
        if names and len(names[0]) == ds.sizes["ablation"]:
            ds = ds.assign_coords(ablation=list(names[0]))  # evaluation tables: rows by ablation name
    if valid_only and SAMPLE_DIM in ds.sizes:
        ds = ds.isel({SAMPLE_DIM: np.flatnonzero(store.read_valid())})
    return ds


def _xarray_coords(store: RunStore, group: str, sizes: dict[str, int]) -> dict[str, Any]:
    """Coordinates of `open_xarray`: real layer numbers, row numbers and sample keys, else 0…n−1."""
    import re

    layers = store.attrs.get("layers") or {}
    known: dict[str, Any] = {"layer": layers.get("heads"), "token_layer": layers.get("tokens")}
    found = re.search(r"layer_(\d+)", group)
    if found:
        later = layers.get("second_order") or {}
        known["later_layer"] = later.get(found.group(1), later.get(int(found.group(1))))
    out: dict[str, Any] = {}
    for dim, size in sizes.items():
        values = known.get(dim)
        out[dim] = np.asarray(values, np.int64) if values is not None and len(values) == size else np.arange(size)
    if SAMPLE_DIM in sizes:
        keys = np.full(sizes[SAMPLE_DIM], "", dtype=object)
        samples = read_samples(store)
        if samples.num_rows:
            keys[np.asarray(samples["row"].to_numpy())] = np.asarray(samples["key"].to_pylist(), dtype=object)
        out["key"] = (SAMPLE_DIM, keys.astype(str))
    return out


def _check_rows(store: RunStore, rows: Sequence[int] | np.ndarray | int) -> np.ndarray:
    rows = np.atleast_1d(np.asarray(rows))
    if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
        raise ConfigError(f"rows must be row numbers, got {rows.dtype} with shape {rows.shape}")
    rows = rows.astype(np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= store.n_rows):
        raise ConfigError(f"rows must lie in [0, {store.n_rows}), got {rows.min()}…{rows.max()}")
    return rows


def rows_for_keys(store: RunStore, keys: Sequence[str], samples: pa.Table | None = None) -> np.ndarray:
    """Row numbers of samples by key, in the given order; StoreError for unknown or ambiguous keys."""
    table = read_samples(store) if samples is None else samples
    found: dict[str, list[int]] = {}
    wanted = set(keys)
    for key, row in zip(table["key"].to_pylist(), table["row"].to_pylist()):
        if key in wanted:
            found.setdefault(key, []).append(row)
    missing = [k for k in keys if k not in found]
    if missing:
        raise StoreError(f"{len(missing)} sample key(s) not in {store.url}, e.g. {missing[:3]}")
    ambiguous = {k: v for k, v in found.items() if len(v) > 1}
    if ambiguous:
        key, rows = next(iter(ambiguous.items()))
        raise StoreError(f"sample key {key!r} names several rows {rows[:5]} in {store.url}; use row numbers")
    return np.array([found[k][0] for k in keys], dtype=np.int64)


def sample_info(store: RunStore, rows: Sequence[int] | np.ndarray, samples: pa.Table | None = None) -> pa.Table:
    """The sample-index rows for these row numbers, in the given order (StoreError if one is unindexed)."""
    rows = _check_rows(store, rows)
    table = read_samples(store) if samples is None else samples
    indexed = table["row"].to_numpy()  # sorted by row
    position = np.minimum(np.searchsorted(indexed, rows), max(indexed.size - 1, 0))
    ok = indexed[position] == rows if indexed.size else np.zeros(rows.shape, bool)
    if not ok.all():
        raise StoreError(f"rows {rows[~ok][:5].tolist()} of {store.url} have no entry in the sample index")
    return table.take(pa.array(position))


def topk_rows(scores: np.ndarray, k: int, valid: np.ndarray | None = None) -> np.ndarray:
    """Rows of the k highest scores, best first; ties go to the lower row; NaN and invalid rows never.

    Returns fewer than k rows when fewer candidates exist.
    """
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ConfigError(f"scores must be 1-d (one per row), got shape {scores.shape}")
    if not _is_int(k) or k < 1:
        raise ConfigError(f"k must be an integer ≥ 1, got {k!r}")
    candidate = ~np.isnan(scores) if scores.dtype.kind == "f" else np.ones(scores.shape, bool)
    if valid is not None:
        valid = np.asarray(valid)
        if valid.shape != scores.shape or valid.dtype != np.bool_:
            raise ConfigError(f"valid must be a bool array of shape {scores.shape}, got {valid.dtype} {valid.shape}")
        candidate &= valid
    rows = np.flatnonzero(candidate)
    values = scores[rows]
    if rows.size > k:
        threshold = np.partition(values, rows.size - k)[rows.size - k]
        keep = values >= threshold  # every tie at the threshold survives; lexsort then decides
        rows, values = rows[keep], values[keep]
    order = np.lexsort((rows, -values.astype(np.float64) if values.dtype.kind != "f" else -values))
    return rows[order][:k]


def read_rows(store: RunStore, rows: Sequence[int] | np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Several per-sample arrays at the given rows (in that order)."""
    rows = _check_rows(store, rows)
    for name in names:
        if not store.is_per_sample(name):
            raise ConfigError(f"{name!r} is not a per-sample array")
    return {name: store.read(name, rows) for name in names}


def image_array_names(store: RunStore) -> list[str]:
    """``image_embedding`` and the per-sample ``direct/…`` arrays present in the store."""
    return [
        n
        for n in store.array_names(per_sample=True)
        if n == EMBEDDING_ARRAY or n.startswith(IMAGE_ARRAYS_PREFIX)
    ]


def read_image(
    store: RunStore,
    sample: int | str,
    names: Sequence[str] | None = None,
    *,
    allow_invalid: bool = False,
) -> dict[str, np.ndarray]:
    """One image's embedding and direct effects (row number or sample key) without the sample axis."""
    if isinstance(sample, str):
        row = int(rows_for_keys(store, [sample])[0])
    elif _is_int(sample):
        row = int(_check_rows(store, [sample])[0])
    else:
        raise ConfigError(f"sample must be a row number or a sample key, got {sample!r}")
    if not allow_invalid and not bool(store.read_valid(slice(row, row + 1))[0]):
        raise StoreError(f"row {row} of {store.url} holds no decoded sample (valid=False)")
    names = image_array_names(store) if names is None else list(names)
    return {name: arr[0] for name, arr in read_rows(store, [row], names).items()}


def _array_file(name: str) -> str:
    return name.replace("/", "__") + ".npy"


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _inside(url: str, folder: str) -> bool:
    return url == folder or url.startswith(folder.rstrip("/") + "/")


def _check_export_destination(store: RunStore, out: Location, overwrite: bool) -> None:
    if _inside(out.url, store.url):
        raise ConfigError(f"export destination {out.url} is inside the run store {store.url}; export outside it")
    if out.is_local_path:
        folder = os.path.dirname(out.url)
        while folder and folder != os.path.dirname(folder):
            if os.path.isfile(os.path.join(folder, "zarr.json")):
                raise ConfigError(f"export destination {out.url} is inside the zarr store {folder}; export outside it")
            folder = os.path.dirname(folder)
    if out.fs.exists(out.root) and not overwrite:
        is_empty_folder = out.fs.isdir(out.root) and not out.fs.ls(out.root)
        if not is_empty_folder:
            raise ConfigError(f"export destination {out.url} exists; pass --overwrite to replace it")


def export_rows(
    store: RunStore,
    rows: Sequence[int] | np.ndarray,
    names: Sequence[str],
    dest: str,
    *,
    format: str | None = None,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> str:
    """Export the given rows of chosen per-sample arrays; returns the destination.

    * ``parquet`` (dest ends in ``.parquet``): one row per sample with ``row``, the sample-index
      columns when an index exists, and one fixed-shape-tensor column per array (named by its path,
      the tensor type carries the dim names);
    * ``npy`` (any other dest, a folder): ``rows.npy``, one ``<path with / as __>.npy`` per array and
      ``index.json`` mapping array names to files and dims.

    An existing destination is refused unless ``overwrite``; a destination inside a run store
    (this one or another) always is.
    """
    fmt = format or ("parquet" if dest.endswith(".parquet") else "npy")
    if fmt not in ("parquet", "npy"):
        raise ConfigError(f"format must be 'parquet' or 'npy', got {fmt!r}")
    out = Location(dest, storage_options)
    _check_export_destination(store, out, overwrite)
    rows = _check_rows(store, rows)
    data = read_rows(store, rows, names)
    if fmt == "npy":
        index: dict[str, Any] = {"rows": "rows.npy", "store": store.url, "arrays": {}}
        out.write_bytes_atomic(_npy_bytes(rows), "rows.npy")
        for name, array in data.items():
            out.write_bytes_atomic(_npy_bytes(array), _array_file(name))
            index["arrays"][name] = {"file": _array_file(name), "dims": list(store.dims(name))}
        out.write_bytes_atomic(json.dumps(index, indent=1).encode(), "index.json")
        return out.url

    columns: dict[str, pa.Array] = {"row": pa.array(rows, pa.int64())}
    samples = read_samples(store)
    if samples.num_rows:
        info = sample_info(store, rows, samples)
        for column in ("key", "shard", "shard_index", "label", "caption", "error"):
            columns[column] = info[column].combine_chunks()
    for name, array in data.items():
        dims = store.dims(name)
        tail_dims = [d for d in dims if d != SAMPLE_DIM]
        if array.ndim == 1:
            columns[name] = pa.array(array)
            continue
        tensor_type = pa.fixed_shape_tensor(pa.from_numpy_dtype(array.dtype), array.shape[1:], dim_names=tail_dims)
        columns[name] = pa.ExtensionArray.from_storage(
            tensor_type,
            pa.FixedSizeListArray.from_arrays(
                pa.array(np.ascontiguousarray(array).reshape(-1)), int(np.prod(array.shape[1:]))
            ),
        )
    table = pa.table(columns).replace_schema_metadata({"clipscope_store": store.url})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    out.write_bytes_atomic(sink.getvalue().to_pybytes())
    return out.url
