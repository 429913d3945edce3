"""Random access to the samples of webdataset shards: a per-shard member offset index.

A tar holds each member's bytes contiguously after its 512-byte header, so one header scan of a shard
(seeking over the data, ``walk_tar_groups``' way) records, per sample key and member suffix, the byte
offset and size of the data; a reader then fetches one sample's image with one ranged read, never a
scan. The index of shard ``i`` is stored once beside the store's manifest, as
``members/part-{i:06d}.parquet`` (``storage.layout.MEMBERS_DIR``): columns ``key`` (string), ``suffix``
(string, lower case), ``offset`` and ``size`` (int64), with the shard's URL and byte size in the file's
metadata, so a shard rewritten since (another size) is refused instead of read at stale offsets.

Keys and suffixes follow webdataset's split (``split_member_name``), as extraction does, so the key of
a stored row finds its members. Only uncompressed tars can be read at random; a compressed shard
(``.tar.gz``, ``.tar.zst``…) is refused with one line.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from clipscope.errors import DataError, StoreError
from clipscope.pipelines.data.webdataset_input import (
    IMAGE_EXTENSIONS,
    _COMPRESSED_MAGIC,
    is_url,
    open_shard,
    split_member_name,
)
from clipscope.storage.layout import MEMBERS_DIR
from clipscope.storage.results import store_lock
from clipscope.storage.store import RunStore

SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("suffix", pa.string(), nullable=False),
    pa.field("offset", pa.int64(), nullable=False),
    pa.field("size", pa.int64(), nullable=False),
])


def part_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


@dataclass(frozen=True)
class MemberIndex:
    """Where the members of one shard lie: key → {suffix: (offset, size)}; `shard_size` in bytes."""

    url: str
    shard_size: int
    members: dict[str, dict[str, tuple[int, int]]]

    def table(self) -> pa.Table:
        rows: dict[str, list] = {"key": [], "suffix": [], "offset": [], "size": []}
        for key, members in self.members.items():
            for suffix, (offset, size) in members.items():
                rows["key"].append(key)
                rows["suffix"].append(suffix)
                rows["offset"].append(offset)
                rows["size"].append(size)
        meta = {b"clipscope_shard": self.url.encode(), b"clipscope_shard_size": str(self.shard_size).encode()}
        return pa.table(rows, schema=SCHEMA).replace_schema_metadata(meta)

    @classmethod
    def from_table(cls, table: pa.Table) -> MemberIndex:
        meta = table.schema.metadata or {}
        members: dict[str, dict[str, tuple[int, int]]] = {}
        columns = [table[name].to_pylist() for name in ("key", "suffix", "offset", "size")]
        for key, suffix, offset, size in zip(*columns):
            members.setdefault(key, {})[suffix] = (int(offset), int(size))
        return cls(meta.get(b"clipscope_shard", b"").decode(), int(meta.get(b"clipscope_shard_size", b"-1")), members)

    def image_member(self, key: str) -> str | None:
        """The suffix extraction decodes as the image of `key` (webdataset_input's choice), or None."""
        members = self.members.get(key, {})
        for ext in IMAGE_EXTENSIONS:
            if ext in members:
                return ext
        for suffix in members:  # compound suffixes such as ``0.jpg``: first in tar order
            if suffix.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
                return suffix
        return None


def _fs_and_path(url: str, storage_options: dict[str, Any] | None):
    if is_url(url):
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fsspec.filesystem("file"), url


def shard_size(url: str, storage_options: dict[str, Any] | None = None) -> int:
    """The shard's size in bytes (DataError naming it when it is gone)."""
    if url.startswith("pipe:"):
        raise DataError(f"shard {url} is a pipe: command; its members cannot be read at random")
    fs, path = _fs_and_path(url, storage_options)
    try:
        return int(fs.size(path))
    except FileNotFoundError as exc:
        raise DataError(f"shard not found: {url}") from exc


def scan_shard(url: str, storage_options: dict[str, Any] | None = None) -> MemberIndex:
    """One header scan of an uncompressed tar shard (seeking over member data)."""
    size = shard_size(url, storage_options)
    members: dict[str, dict[str, tuple[int, int]]] = {}
    with open_shard(url, storage_options) as stream:
        head = stream.read(6)
        if any(head.startswith(magic) for magic in _COMPRESSED_MAGIC):
            raise DataError(f"shard {url} is compressed: its images cannot be read at random (members lie inside "
                            f"the compressed stream); keep an uncompressed copy of the shards to view images")
        stream.seek(0)
        try:
            tf = tarfile.TarFile(fileobj=stream, mode="r")
            while True:
                info = tf.next()
                tf.members = []
                if info is None:
                    break
                split = split_member_name(info.name) if info.isreg() else None
                if split is None:
                    continue
                key, suffix = split
                members.setdefault(key, {}).setdefault(suffix, (int(info.offset_data), int(info.size)))
        except (tarfile.TarError, EOFError) as exc:
            if not members:
                raise DataError(f"shard {url} is not a readable tar archive ({exc})") from exc
            # A truncated tar: the members before the break are indexed, as extraction kept them.
    return MemberIndex(url, size, members)


def read_member(index: MemberIndex, key: str, suffix: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The bytes of member `key.suffix` of the indexed shard: one ranged read."""
    where = index.members.get(key, {}).get(suffix)
    if where is None:
        raise StoreError(f"shard {index.url} has no member {key}.{suffix} in its member index")
    offset, size = where
    fs, path = _fs_and_path(index.url, storage_options)
    try:
        with fs.open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
    except FileNotFoundError as exc:
        raise DataError(f"shard not found: {index.url}") from exc
    if len(data) != size:
        raise DataError(f"shard {index.url} ends inside member {key}.{suffix} (it changed since it was indexed)")
    return data


def read_stored_index(store: RunStore, shard: int) -> MemberIndex | None:
    """The stored index of shard number `shard`, or None when it has not been built."""
    raw = store.location.read_bytes(MEMBERS_DIR, part_name(shard))
    if raw is None:
        return None
    try:
        table = pq.read_table(pa.BufferReader(raw), use_threads=False)
    except (pa.ArrowInvalid, ValueError) as exc:
        raise StoreError(f"unreadable member index {store.location.child_url(MEMBERS_DIR, part_name(shard))}: "
                         f"{exc}") from exc
    return MemberIndex.from_table(table)


def check_current(index: MemberIndex, storage_options: dict[str, Any] | None = None) -> MemberIndex:
    """`index` if its shard still has the size it had when indexed; DataError otherwise."""
    size = shard_size(index.url, storage_options)
    if size != index.shard_size:
        raise DataError(f"shard {index.url} changed since its member index was built ({index.shard_size} → {size} "
                        f"bytes); rebuild it with `clipscope view STORE --build-index --force`")
    return index


def build_member_index(store: RunStore, shards: Iterable[int] | None = None, *, force: bool = False,
                       storage_options: dict[str, Any] | None = None) -> list[int]:
    """Scan the store's shards and write `members/part-*.parquet` for those without one (all with `force`);
    holds the store's writer lock. Returns the shard numbers indexed now."""
    store._require_writable("build_member_index")
    urls = list(store.info.shards)
    chosen = range(len(urls)) if shards is None else list(shards)
    done = []
    with store_lock(store, owner="clipscope view --build-index"):
        for shard in chosen:
            if not 0 <= shard < len(urls):
                raise StoreError(f"shard {shard} is not a shard of {store.url} (it has {len(urls)})")
            if not force and store.location.exists(MEMBERS_DIR, part_name(shard)):
                continue
            index = scan_shard(urls[shard], storage_options)
            sink = pa.BufferOutputStream()
            pq.write_table(index.table(), sink, compression="zstd")
            store.location.write_bytes_atomic(sink.getvalue().to_pybytes(), MEMBERS_DIR, part_name(shard))
            done.append(shard)
    return done
