"""Shards with masks and groups for the segmentation and store-prerequisite tests."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_masked_shards(folder, counts=(5, 6), seed=0, member="mask.png"):
    """Non-square images with masks (`member`) and a json group; sample 2 of each shard has no mask."""
    from clipscope.pipelines.data.webdataset_input import write_shard

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    masks, groups = {}, {}
    for s, count in enumerate(counts):
        samples = []
        for i in range(count):
            h, w = int(rng.integers(30, 90)), int(rng.integers(30, 90))
            key = f"s{s}-{i}"
            sample = {"__key__": key, "png": Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)),
                      "json": {"group": (i + s) % 3} if i != 1 else {}, "cls": i}
            if i != 2:
                mask = rng.integers(0, 4, (h, w), dtype=np.uint8)
                sample[member] = Image.fromarray(mask) if member.endswith(".png") else npy_bytes(mask)
                masks[key] = mask
            groups[key] = (i + s) % 3 if i != 1 else -1
            samples.append(sample)
        write_shard(os.path.join(folder, f"shard-{s}.tar"), samples)
    return str(folder), masks, groups
