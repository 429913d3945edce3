"""Images for the viewer: read from the original shards by key through the member offset index, scaled,
cached in memory; and the topic maps drawn over them.

A shard's index is the one stored in the store (`clipscope view STORE --build-index`); a shard without one
is scanned once (headers only) when its first image is asked for and the index is kept in memory, never
written (the viewer does not write the store). Thumbnails are kept in an in-memory LRU cache.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
from PIL import Image

from clipscope.errors import DataError, ParameterError
from clipscope.pipelines.data import member_index
from clipscope.pipelines.view.data import NotFound, StoreView

logger = logging.getLogger(__name__)

SIZES = (64, 96, 128, 192, 256)
_CACHE_ITEMS = 4096


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class ImageSource:
    """Thumbnails of a store's samples by key (PNG bytes), from their shards."""

    def __init__(self, view: StoreView, storage_options: dict[str, Any] | None = None):
        self.view = view
        self.storage_options = storage_options
        self._lock = threading.Lock()
        self._indices: dict[int, member_index.MemberIndex] = {}
        self._shard_locks: dict[int, threading.Lock] = {}
        self._cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self.scans = 0  # shards scanned in this process (no stored index)
        self.reads = 0  # member reads from shards (cache misses)

    def index_of(self, shard: int) -> member_index.MemberIndex:
        with self._lock:
            if shard in self._indices:
                return self._indices[shard]
            shard_lock = self._shard_locks.setdefault(shard, threading.Lock())
        with shard_lock:
            with self._lock:
                if shard in self._indices:
                    return self._indices[shard]
            index = member_index.read_stored_index(self.view.store, shard)
            if index is None:
                urls = self.view.info.shards
                if not 0 <= shard < len(urls):
                    raise NotFound(f"shard {shard} is not a shard of {self.view.url}")
                logger.warning("shard %s has no stored member index: scanning its headers once (store it with "
                               "`clipscope view %s --build-index`)", urls[shard], self.view.url)
                index = member_index.scan_shard(urls[shard], self.storage_options)
                self.scans += 1
            else:
                member_index.check_current(index, self.storage_options)
            with self._lock:
                self._indices[shard] = index
            return index

    def original(self, key: str) -> Image.Image:
        """The sample's image as extraction decoded it (RGB)."""
        row = self.view.row_of(key)
        sample = self.view.sample(row)
        index = self.index_of(int(sample["shard_index"]))
        suffix = index.image_member(key)
        if suffix is None:
            raise NotFound(f"sample {key!r} has no image member in {index.url}")
        data = member_index.read_member(index, key, suffix, self.storage_options)
        self.reads += 1
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
        except Exception as exc:  # PIL raises many types for bad bytes
            raise DataError(f"sample {key!r}: its image cannot be decoded ({type(exc).__name__})") from None

    def thumbnail(self, key: str, size: int) -> bytes:
        """PNG of the image scaled so its longer side is `size` (upscaled with nearest pixels)."""
        if size not in SIZES:
            raise ParameterError("size", f"must be one of {list(SIZES)}, got {size}")
        with self._lock:
            cached = self._cache.get((key, size))
            if cached is not None:
                self._cache.move_to_end((key, size))
                return cached
        image = self.original(key)
        scale = size / max(image.size)
        shape = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
        resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
        data = png_bytes(image.resize(shape, resample))
        with self._lock:
            self._cache[(key, size)] = data
            while len(self._cache) > _CACHE_ITEMS:
                self._cache.popitem(last=False)
        return data

    def map_overlay(self, key: str, values: np.ndarray, size: int = 256) -> bytes:
        """The map drawn over the image: red where the text's direction is positive, blue where negative
        (scaled by the largest |value|), half transparent."""
        from matplotlib import colormaps

        image = self.original(key)
        scale = size / max(image.size)
        shape = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
        base = image.resize(shape, Image.Resampling.BICUBIC).convert("RGBA")
        values = np.asarray(values, np.float64)
        peak = float(np.abs(values).max()) or 1.0
        colours = colormaps["RdBu_r"]((values / peak + 1) / 2)  # [gh, gw, 4] in 0..1
        colours[..., 3] = 0.55
        heat = Image.fromarray((colours * 255).astype(np.uint8), "RGBA").resize(shape, Image.Resampling.NEAREST)
        return png_bytes(Image.alpha_composite(base, heat).convert("RGB"))
