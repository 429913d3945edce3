"""PNG overlays of the CLIP-InterpreT maps on their image: topic maps (sequential colour map) and contrastive
maps (diverging colour map, symmetric scale), titled, labelled, with a colour bar and the image underneath.

The image is shown at the model's input geometry (the store's model's own resize and crop), so map
pixel (y, x) lies over image pixel (y, x).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipscope.errors import StoreError
from clipscope.pipelines.models.loading import LoadedModel
from clipscope.pipelines.query.interpret import ContrastMap, TopicMap, load_image
from clipscope.storage.store import RunStore


def sample_image(store: RunStore, row: int):
    """The stored row's image, read from its shard (samples.parquet names the shard and the key)."""
    from clipscope.pipelines.data.webdataset_input import decode_or_error, iter_shard_samples

    samples = store.read_samples().to_pydict()
    if row not in samples["row"]:
        raise StoreError(f"row {row} of {store.url} is not in its sample index")
    at = samples["row"].index(row)
    key, url = samples["key"][at], samples["shard"][at]
    shard = iter_shard_samples(url, storage_options=store.storage_options)
    try:
        for raw in shard:
            if raw.key == key:
                image, error = decode_or_error(raw)
                if image is None:
                    raise StoreError(f"the image of row {row} cannot be read back from {url}: {error}")
                return image
    finally:
        shard.close()
    raise StoreError(f"sample {key} of row {row} is no longer in its shard {url}")


def input_picture(loaded: LoadedModel, image: Any) -> np.ndarray:
    """[h w 3] floats in [0, 1]: the image as the model sees it (its resize and crop), colours un-normalised."""
    x = loaded.preprocess(load_image(image)).float()
    cfg = getattr(loaded.model.visual, "preprocess_cfg", {}) or {}
    mean = np.asarray(cfg.get("mean", (0.0, 0.0, 0.0)), np.float32)[:, None, None]
    std = np.asarray(cfg.get("std", (1.0, 1.0, 1.0)), np.float32)[:, None, None]
    return np.clip(x.numpy() * std + mean, 0, 1).transpose(1, 2, 0)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_topic(picture: np.ndarray, maps: Sequence[TopicMap], path: str | Path, *, title: str,
               labels: Sequence[str] | None = None) -> Path:
    """One panel per map: the image, its min–max map over it (viridis, 55% opaque), a colour bar."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(2.8 * (len(maps) + 1), 3.4), squeeze=False)
    axes[0, 0].imshow(picture)
    axes[0, 0].set_title("image (model input)", fontsize=8)
    image = None
    for ax, m, label in zip(axes[0, 1:], maps, labels or [m.text for m in maps]):
        ax.imshow(picture)
        image = ax.imshow(m.display, cmap="viridis", vmin=0, vmax=1, alpha=0.55)
        ax.set_title(textwrap.fill(label, 28), fontsize=8)
    for ax in axes[0]:
        ax.set_xlabel("x (pixel)", fontsize=7)
        ax.set_ylabel("y (pixel)", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="map, min–max over the image (1 = strongest)")
    fig.suptitle(title, fontsize=9)
    out = Path(path)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_contrast(picture: np.ndarray, contrast: ContrastMap, path: str | Path, *, title: str) -> Path:
    """The image, and D = m₁ − m₂ over it on a diverging scale symmetric around 0 (red: text 1, blue: text 2)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.4), squeeze=False)
    axes[0, 0].imshow(picture)
    axes[0, 0].set_title("image (model input)", fontsize=8)
    ax = axes[0, 1]
    ax.imshow(picture)
    scale = max(contrast.scale, 1e-12)
    image = ax.imshow(contrast.difference, cmap="coolwarm", vmin=-scale, vmax=scale, alpha=0.6)
    ax.set_title(textwrap.fill(f"red: {contrast.first.text!r}  vs  blue: {contrast.second.text!r}", 34), fontsize=8)
    for a in axes[0]:
        a.set_xlabel("x (pixel)", fontsize=7)
        a.set_ylabel("y (pixel)", fontsize=7)
        a.tick_params(labelsize=6)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="m(text 1) − m(text 2)  (per pixel, ρ = c/‖M(I)‖)")
    fig.suptitle(title, fontsize=9)
    out = Path(path)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
