"""Helpers of the pipeline tests (imported by conftest.py and the test modules): tiny webdataset
shards and in-process CLI calls."""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

TINY_MODEL = "clipscope-tiny"
CORRUPT_BYTES = b"\xff\xd8 this is not a JPEG"


def random_image_bytes(rng: np.random.Generator, fmt: str) -> bytes:
    """A small random RGB image (varying size and aspect, so preprocess resizes and crops)."""
    h, w = int(rng.integers(24, 90)), int(rng.integers(24, 90))
    pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@dataclass
class TinyDataset:
    """Shards on disk and what went into them, by sample key."""

    folder: str
    paths: list[str]
    counts: list[int]
    images: dict[str, bytes] = field(default_factory=dict)  # key -> encoded image (corrupt ones too)
    labels: dict[str, int] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)

    @property
    def pattern(self) -> str:
        """A brace pattern naming every shard (what a user types)."""
        return os.path.join(self.folder, "shard-{%03d..%03d}.tar" % (0, len(self.paths) - 1))


def write_tiny_shards(folder, counts, *, seed: int = 0, corrupt: tuple[tuple[int, int], ...] = ()) -> TinyDataset:
    """`len(counts)` shards shard-000.tar…; sample i of shard s has key s{s}-{i:03d}, a PNG or JPEG
    image, a class label and a caption. `corrupt` lists (shard, sample) whose image bytes are garbage."""
    from clipscope.pipelines.data.webdataset_input import write_shard

    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = TinyDataset(folder, [], list(counts))
    for s, count in enumerate(counts):
        samples = []
        for i in range(count):
            key = f"s{s}-{i:03d}"
            ext, fmt = ("png", "PNG") if (s + i) % 2 == 0 else ("jpg", "JPEG")
            image = random_image_bytes(rng, fmt)
            if (s, i) in corrupt:
                image = CORRUPT_BYTES
                data.corrupt.add(key)
            label, caption = int(rng.integers(0, 1000)), f"caption of {key}"
            samples.append({"__key__": key, ext: image, "cls": label, "txt": caption})
            data.images[key], data.labels[key], data.captions[key] = image, label, caption
        path = os.path.join(folder, f"shard-{s:03d}.tar")
        write_shard(path, samples)
        data.paths.append(path)
    return data


def decoded_image(image_bytes: bytes) -> Image.Image:
    with Image.open(io.BytesIO(image_bytes)) as image:
        return image.convert("RGB")


def run_cli(*argv: str) -> int:
    """`clipscope ARGV…` in this process; returns the exit code."""
    from clipscope.pipelines.cli import main

    return main([str(a) for a in argv])


def extract_args(data, out, *extra) -> list[str]:
    """Arguments of a quiet tiny-model extraction (rows_per_chunk 4, batch 4 unless `extra` overrides)."""
    return ["extract", *([data] if isinstance(data, str) else data), "--out", str(out), "--model", TINY_MODEL,
            "--rows-per-chunk", "4", "--batch-size", "4", "--progress", "off", *map(str, extra)]


def truncate_inside_sample(path: str, sample: int) -> None:
    """Cut the tar in the middle of the first member's data of sample number `sample`."""
    with tarfile.open(path) as tf:
        keys = []
        for info in tf.getmembers():
            key = info.name.split(".", 1)[0]
            if key not in keys:
                keys.append(key)
                if len(keys) == sample + 1:
                    cut = info.offset_data + info.size // 2
                    break
    with open(path, "r+b") as f:
        f.truncate(cut)
