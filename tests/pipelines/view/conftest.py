"""Fixtures of the viewer tests: a small shapes-world store, extracted with the shipped shapes CLIP and
reduced by every job the viewer shows (TextSpan, second order, OMP), built once per session."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

N_IMAGES = 48
NEURON_LAYER = 2
TEXTSPAN_LAYERS = (2, 3)


def build_shapes_store(root: Path) -> str:
    """Generate one shard of the shapes world, extract it in this process and run the reductions."""
    from clipscope.pipelines.jobs import means, second_order, textspan
    from clipscope.pipelines.jobs import neurons as neuron_job
    from clipscope.pipelines.jobs.extract.job import run_extract
    from clipscope.pipelines.jobs.extract.settings import ExtractConfig
    from clipscope.pipelines.texts.pools import get_pool
    from clipscope.pipelines.worlds.shapes.train import CHECKPOINT, SHAPES_MODEL, load_shapes_model
    from clipscope.pipelines.worlds.shapes.world import write_world
    from clipscope.storage.store import RunStore

    data = root / "data"
    write_world(data, 1, N_IMAGES, 0)
    loaded = load_shapes_model()
    n_layers = loaded.spec.n_layers
    config = ExtractConfig(data=(str(data),), out=str(root / "store"), model=SHAPES_MODEL, pretrained=str(CHECKPOINT),
                           token_layers=(n_layers - 1,), second_order_layers=(NEURON_LAYER,), rows_per_chunk=16,
                           batch_size=16)
    run_extract(config)
    store = RunStore.open(config.out, "r+")
    means.run(store, means.Settings())
    pool = get_pool("shapes-all")
    textspan.run(store, textspan.Settings(layers=TEXTSPAN_LAYERS, pool=pool.name, basis_size=5, span_rank=16),
                 loaded=loaded)
    second_order.run(store, second_order.Settings(NEURON_LAYER, top_k=8, task="shapes"))
    neuron_job.run(store, neuron_job.Settings(layer=NEURON_LAYER, texts=tuple(pool.texts), pool_name=pool.name,
                                              m=(1, 2, 4), task="shapes"), loaded=loaded)
    return config.out


def tree_digest(path: str) -> dict[str, str]:
    """sha256 of every file under `path` (relative name → digest): the store's bytes."""
    out = {}
    for folder, _, files in os.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="session")
def shapes_store(tmp_path_factory) -> str:
    return build_shapes_store(tmp_path_factory.mktemp("view"))


@pytest.fixture(scope="session")
def shapes_view(shapes_store):
    """A StoreView over the session's shapes store, with the shipped model loaded once."""
    from clipscope.pipelines.view import StoreView

    return StoreView(shapes_store)


@pytest.fixture(scope="session")
def store_digest_before(shapes_store, shapes_view) -> dict[str, str]:
    """The store's bytes before any viewer test touched it (taken after the fixture store was built)."""
    return tree_digest(shapes_store)


def reference_map(store_url: str, row: int, direction, heads=None) -> "object":
    """Brute-force topic map: per patch token, Σ over the stored token layers and `heads` (all by default) of
    ⟨c, u⟩ / ‖image embedding‖, with plain loops."""
    import numpy as np
    import zarr

    group = zarr.open_group(store_url, mode="r")
    tokens = np.asarray(group["direct/tokens"][row], np.float64)
    norm = np.linalg.norm(np.asarray(group["image_embedding"][row], np.float64))
    n_layers, n_heads, n_tokens, _ = tokens.shape
    out = np.zeros(n_tokens - 1)
    for t in range(1, n_tokens):
        for l in range(n_layers):
            for h in (range(n_heads) if heads is None else heads):
                out[t - 1] += float(tokens[l, h, t] @ direction) / norm
    return out


def unit_text(loaded, text: str):
    """The unit text embedding straight from the model's text tower."""
    import numpy as np
    import torch

    with torch.no_grad():
        emb = loaded.model.encode_text(loaded.tokenizer([text]))[0].double().numpy()
    return emb / np.linalg.norm(emb)
