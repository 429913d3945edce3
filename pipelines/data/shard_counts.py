"""Sample counts per shard without decoding images, so the planner can reserve store rows.

Sources, tried in order for each shard:
1. ``index``: a wids shard index (``shardindex.json`` next to the shards, as written by
   ``widsindex create``, or one given explicitly): ``{"shardlist": [{"url": …, "nsamples": N}, …]}``
   with entry URLs relative to the index's ``base`` if set, else to the index's own directory;
2. ``stats``: img2dataset's sidecar ``<shard>_stats.json`` (``000123.tar`` → ``000123_stats.json``),
   whose ``successes`` is the number of samples it wrote into the tar;
3. ``scan`` / ``scan-truncated``: a walk over the tar headers (seeking past member data where the
   stream allows) grouping members into samples exactly as `webdata.iter_shard_samples` does.

Index and stats counts are trusted as written; `webdata.iter_shard_samples(expected_count=…)`
reports any disagreement when the shard is read.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec

from clipscope.errors import ConfigError, DataError
from clipscope.pipelines.data.webdataset_input import is_url, truncation_message, walk_tar_url

INDEX_FILENAME = "shardindex.json"
SOURCE_INDEX = "index"
SOURCE_STATS = "stats"
SOURCE_SCAN = "scan"
SOURCE_SCAN_TRUNCATED = "scan-truncated"


@dataclass(frozen=True)
class ShardCount:
    """A shard's sample count, where it came from, and (for a truncated scan) why it stopped."""

    count: int
    source: str
    error: str | None = None


@dataclass(frozen=True)
class _ShardIndex:
    by_location: Mapping[tuple[str, str], int]
    # Absolute entries (an index written elsewhere, shards copied here) by basename, where unique.
    by_basename: Mapping[str, int]

    def lookup(self, url: str) -> int | None:
        found = self.by_location.get(_location(url))
        if found is None:
            found = self.by_basename.get(_basename(url))
        return found


def shard_sample_count(
    url: str, storage_options: dict[str, Any] | None = None, *, index_url: str | None = None
) -> ShardCount:
    """Count a shard's samples from its index, its img2dataset stats sidecar, or a header scan."""
    index_location = index_url or _default_index_url(url)
    indices = {index_location: _load_index(index_location, storage_options)} if index_location else {}
    return _count_one(url, storage_options, indices, index_location)


def count_all(
    urls: Iterable[str],
    *,
    storage_options: dict[str, Any] | None = None,
    max_workers: int = 8,
    index_url: str | None = None,
) -> list[ShardCount]:
    """`shard_sample_count` for many shards on a thread pool (I/O bound); results in input order.

    Each directory's index is read once. ``index_url`` names one index for all shards instead.
    """
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise ConfigError(f"max_workers must be an integer ≥ 1, got {max_workers!r}")
    urls = list(urls)
    index_for = {url: index_url or _default_index_url(url) for url in urls}
    index_locations = sorted({loc for loc in index_for.values() if loc is not None})
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="clipscope-count") as pool:
        loaded = list(pool.map(lambda loc: _load_index(loc, storage_options), index_locations))
        indices = dict(zip(index_locations, loaded))
        return list(pool.map(lambda url: _count_one(url, storage_options, indices, index_for[url]), urls))


def _count_one(
    url: str,
    storage_options: dict[str, Any] | None,
    indices: Mapping[str, _ShardIndex | None],
    index_location: str | None,
) -> ShardCount:
    index = indices.get(index_location) if index_location else None
    if index is not None:
        found = index.lookup(url)
        if found is not None:
            return ShardCount(found, SOURCE_INDEX)
    stats_url = _stats_url(url)
    if stats_url is not None:
        stats = _read_json(stats_url, storage_options)
        if stats is not None:
            successes = stats.get("successes") if isinstance(stats, dict) else None
            if not _is_count(successes):
                raise DataError(f"{stats_url}: 'successes' must be an integer ≥ 0, got {successes!r}")
            return ShardCount(successes, SOURCE_STATS)
    return scan_sample_count(url, storage_options)


def scan_sample_count(url: str, storage_options: dict[str, Any] | None = None) -> ShardCount:
    """Count samples by walking the tar headers; a truncated archive counts what is readable."""
    walker = walk_tar_url(url, read=lambda suffix: False, seek=True, storage_options=storage_options)
    count = 0
    while True:
        try:
            next(walker)
        except StopIteration as stop:
            if stop.value is None:
                return ShardCount(count, SOURCE_SCAN)
            return ShardCount(count, SOURCE_SCAN_TRUNCATED, truncation_message(count, stop.value))
        count += 1


# ----------------------------------------------------------------------------------------------
# Index and sidecar files


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parent(url: str) -> str | None:
    if url.startswith("pipe:"):
        return None
    if is_url(url):
        return url.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(url))


def _default_index_url(url: str) -> str | None:
    parent = _parent(url)
    return None if parent is None else f"{parent}/{INDEX_FILENAME}"


def _stats_url(url: str) -> str | None:
    parent = _parent(url)
    if parent is None:
        return None
    name = _basename(url)
    stem = re.sub(r"\.tar(\.[A-Za-z0-9]+)?$", "", name)
    if stem == name:
        stem = os.path.splitext(name)[0]
    return f"{parent}/{stem}_stats.json"


def _basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _location(url: str) -> tuple[str, str]:
    """(protocol, normalised path) so ``/a/x.tar``, ``file:///a/x.tar`` and ``memory://a/x.tar``
    compare equal to their other spellings."""
    protocol, path = fsspec.core.split_protocol(url)
    if protocol is None:
        protocol, path = "file", os.path.abspath(path)
    if protocol == "local":
        protocol = "file"
    return protocol, posixpath.normpath(path).lstrip("/")


def _is_absolute(url: str) -> bool:
    return is_url(url) or url.startswith("/")


def _join(base: str, relative: str) -> str:
    if _is_absolute(relative):
        return relative
    return f"{base.rstrip('/')}/{relative}"


def _read_json(url: str, storage_options: dict[str, Any] | None) -> Any | None:
    """Parsed JSON of a small file; None when it does not exist."""
    try:
        if is_url(url):
            with fsspec.open(url, "rb", **(storage_options or {})) as f:
                raw = f.read()
        else:
            with open(url, "rb") as f:
                raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DataError(f"cannot read {url}: {exc}") from exc
    except ImportError as exc:  # s3:// without s3fs, gs:// without gcsfs
        raise DataError(f"cannot read {url}: {exc} (install it into clipscope's environment)") from None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise DataError(f"{url} is not valid JSON: {exc}") from exc


def _load_index(index_url: str, storage_options: dict[str, Any] | None) -> _ShardIndex | None:
    description = _read_json(index_url, storage_options)
    if description is None:
        return None
    shardlist = description.get("shardlist") if isinstance(description, dict) else None
    if not isinstance(shardlist, list):
        raise DataError(f"shard index {index_url} has no 'shardlist' list")
    base = description.get("base") or _parent(index_url) or ""
    by_location: dict[tuple[str, str], int] = {}
    basenames: dict[str, list[int | None]] = {}  # None marks a relative entry
    for position, entry in enumerate(shardlist):
        url = entry.get("url") if isinstance(entry, dict) else None
        nsamples = entry.get("nsamples") if isinstance(entry, dict) else None
        if not isinstance(url, str) or not _is_count(nsamples):
            raise DataError(
                f"shard index {index_url}: entry {position} needs a string 'url' and an integer "
                f"'nsamples' ≥ 0, got {entry!r}"
            )
        by_location[_location(_join(base, url))] = nsamples
        basenames.setdefault(_basename(url), []).append(nsamples if _is_absolute(url) else None)
    by_basename = {
        name: counts[0] for name, counts in basenames.items() if len(counts) == 1 and counts[0] is not None
    }
    return _ShardIndex(by_location, by_basename)
