"""Generated photo-sized webdataset shards shared by the benchmarks (imported as a sibling script module)."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from clipscope.pipelines.data.webdataset_input import write_shard


def photo_like_jpeg(rng: np.random.Generator, size: int = 224) -> bytes:
    """A smooth random image with some texture, JPEG-encoded at quality 90 (photo-sized bytes)."""
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR)
    pixels = np.asarray(coarse, np.int16) + rng.integers(-20, 21, (size, size, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_dataset(folder: str, counts: list[int], seed: int = 0, size: int = 224) -> list[str]:
    """Shards `shard-NNN.tar` in `folder` holding `counts[s]` images (`size` px) each; returns their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for s, count in enumerate(counts):
        samples = [{"__key__": f"{s:03d}-{i:05d}", "jpg": photo_like_jpeg(rng, size), "cls": i, "txt": f"image {i}"}
                   for i in range(count)]
        path = os.path.join(folder, f"shard-{s:03d}.tar")
        write_shard(path, samples)
        paths.append(path)
    return paths


def even_counts(total: int, shards: int) -> list[int]:
    """`total` images over `shards` shards, the first ones one larger where it does not divide."""
    return [total // shards + (s < total % shards) for s in range(shards)]
