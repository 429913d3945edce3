"""The Rosetta dictionary as a PNG (thesis Fig. 4.2): per concept, its top images, each with every model's
map of the concept's first tuple laid over it (standardised, bilinearly upsampled to the image)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipscope.pipelines.jobs.rosetta.result import Result, model_label
from clipscope.pipelines.jobs.rosetta.sources import open_source
from clipscope.pipelines.jobs.rosetta.tiles import load_units
from clipscope.storage.store import RunStore


def example_images(store: RunStore, rows: list[int], geometry: int) -> dict[int, np.ndarray]:
    """row → [S, S, 3] uint8 field of view of the sample, read back from its shard by key."""
    from clipscope.pipelines.data.webdataset_input import decode_or_error, iter_shard_samples
    from clipscope.pipelines.jobs.maps.zoo import field_of_view

    table = store.read_samples().to_pylist()
    by_row = {r["row"]: r for r in table}
    wanted: dict[str, dict[str, int]] = {}
    for row in rows:
        if row in by_row:
            wanted.setdefault(by_row[row]["shard"], {})[by_row[row]["key"]] = row
    out = {}
    for shard, keys in wanted.items():
        samples = iter_shard_samples(shard)
        try:
            for raw in samples:
                if raw.key in keys:
                    image, _ = decode_or_error(raw)
                    if image is not None:
                        view = field_of_view(image, geometry)
                        out[keys[raw.key]] = (view.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        finally:
            samples.close()
    return out


def plot_dictionary(result: Result, store: RunStore, path: str | Path, *, concepts: int = 8, examples: int = 3) -> None:
    """Write the dictionary figure of `result` (anchor store `store`) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = result.arrays
    rows_of = a["dictionary/example_rows"][:concepts, :examples]
    n_models = len(result.models)
    stores = [store] + [RunStore.open(i["url"], "r") for i in result.attrs["inputs"][1:]]
    sources = [open_source(s, tuple(i["layers"]), "model") for s, i in zip(stores, result.attrs["inputs"])]
    geometry = result.attrs["inputs"][0]["geometry"] or 224
    images = example_images(store, [int(r) for r in rows_of.ravel() if r >= 0], geometry)
    n_concepts = rows_of.shape[0]
    fig, axes = plt.subplots(max(n_concepts, 1), examples * n_models,
                             figsize=(1.4 * examples * n_models, 1.5 * max(n_concepts, 1)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    concept_of = a["tuples/concept"]
    for c in range(n_concepts):
        first = a["tuples/members"][np.flatnonzero(concept_of == c)[0]]
        for e, row in enumerate(rows_of[c]):
            if row < 0 or int(row) not in images:
                continue
            image = images[int(row)]
            for m in range(n_models):
                unit = int(first[m])
                maps = load_units(sources[m], np.asarray([unit]), np.asarray([int(row)]))
                mean = a[f"units/{model_label(m)}/mean"][unit]
                std = a[f"units/{model_label(m)}/std"][unit] or 1.0
                z = torch.from_numpy((maps - mean) / std)
                up = F.interpolate(z, size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0].numpy()
                ax = axes[c, e * n_models + m]
                ax.imshow(image)
                ax.imshow(up, cmap="jet", alpha=0.45, vmin=-3, vmax=3)
                if c == 0:
                    ax.set_title(f"{result.describe_unit(m, unit) if e == 0 else model_label(m)}", fontsize=5)
        axes[c, 0].text(-0.1, 0.5, f"concept {c}", transform=axes[c, 0].transAxes, ha="right", va="center",
                        fontsize=7)
    fig.suptitle(f"Rosetta dictionary {result.settings.name}: top images per concept, each model's map", fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
