"""Helpers shared by the storage tests: a small run layout and deterministic rows (uniquely named
module so that it cannot collide with other test folders' conftest modules)."""

from __future__ import annotations

import uuid

import numpy as np

from clipscope.storage.layout import ArraySpec, plan_row_blocks, total_rows
from clipscope.storage.store import RunStore

BACKENDS = ["local", "file", "memory"]

SPECS = [
    ArraySpec("image_embedding", ("sample", "embed"), (6,), "float32"),
    ArraySpec("direct/heads", ("sample", "layer", "head", "embed"), (2, 3, 6), "float32"),
    ArraySpec("direct/mlps", ("sample", "layer", "embed"), (2, 6), "float32"),
    ArraySpec("direct/embedding", ("sample", "embed"), (6,), "float32"),
    ArraySpec("direct/bias", ("sample", "embed"), (6,), "float32"),
    ArraySpec("second_order/layer_0/weights", ("sample", "later_layer", "head", "neuron"), (1, 3, 4), "float16"),
    ArraySpec(
        "second_order/layer_0/directions",
        ("later_layer", "head", "neuron", "embed"),
        (1, 3, 4, 6),
        "float32",
        per_sample=False,
    ),
]
ATTRS = {
    "config": {"model": {"name": "tiny-vit", "pretrained": "none"}, "batch_size": 8},
    "code_version": "0.1.0+test",
    "shards": ["shard-a.tar", "shard-b.tar", "shard-c.tar"],
}
COUNTS = [5, 0, 7]
ROWS_PER_CHUNK = 4


def make_url(kind: str, tmp_path) -> str:
    name = f"run-{uuid.uuid4().hex[:8]}.zarr"
    if kind == "local":
        return str(tmp_path / name)
    if kind == "file":
        return f"file://{tmp_path / name}"
    return f"memory://clipscope-tests/{name}"


def block_rows(block, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Deterministic rows for a block: real values for `count` rows, zero padding after."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in SPECS:
        if not spec.per_sample:
            continue
        data = rng.standard_normal((block.capacity, *spec.shape_tail)).astype(spec.dtype)
        data[block.count :] = 0
        arrays[spec.name] = data
    valid = np.zeros(block.capacity, bool)
    valid[: block.count] = True
    return arrays, valid


def filled_store(url: str, **kwargs) -> RunStore:
    """A store with every shard of COUNTS written."""
    blocks = plan_row_blocks(COUNTS, ROWS_PER_CHUNK)
    store = RunStore.create(
        url, arrays=SPECS, n_rows=total_rows(blocks), rows_per_chunk=ROWS_PER_CHUNK, attrs=ATTRS, **kwargs
    )
    for block in blocks:
        if block.capacity:
            arrays, valid = block_rows(block, seed=block.index)
            store.write_rows(block.start, arrays, valid)
    return store


def raw_objects(store: RunStore) -> dict[str, bytes]:
    """Every stored object of the zarr hierarchy (chunks and metadata) by path."""
    fs, root = store.location.fs, store.location.root
    fs.invalidate_cache(root)
    return {p: fs.cat_file(p) for p in sorted(fs.find(root)) if "/manifest/" not in p}
