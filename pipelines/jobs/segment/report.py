"""Text and figures of the segment job: the metrics table, and overlays of a few rows' maps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clipscope.pipelines.jobs.segment.result import Result


def format_segmentation(results: Sequence[Result]) -> str:
    """One line per method: pixel accuracy, mIoU, mAP over the scored images (the official protocol)."""
    lines = [f"{'method':10s} {'pixel acc':>9s} {'mIoU':>7s} {'mAP':>7s} {'images':>7s}  protocol"]
    for r in results:
        m = r.metrics()
        threshold = r.threshold if isinstance(r.threshold, str) else f"{r.threshold:g}"
        lines.append(f"{r.settings.method:10s} {m['pixel_acc']:9.4f} {m['miou']:7.4f} {m['map']:7.4f} {m['n']:7d}  "
                     f"{r.task}, {r.settings.class_mode} class, {'clip at 0, ' if r.clip else ''}min–max, "
                     f"> {threshold}, target {r.settings.target}")
    return "\n".join(lines)


def plot_segmentation(pictures: dict[int, np.ndarray], maps: dict[str, list], path: str | Path, *,
                      title: str) -> Path:
    """One row per image: the image, then per method its normalised map over the image with the predicted
    foreground outlined (white) and the true mask outlined (black)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(pictures)
    methods = list(maps)
    fig, axes = plt.subplots(len(rows), len(methods) + 1, figsize=(2.4 * (len(methods) + 1), 2.4 * len(rows) + 0.8),
                             squeeze=False)
    image = None
    for i, row in enumerate(rows):
        axes[i, 0].imshow(pictures[row])
        axes[i, 0].set_ylabel(f"row {row}", fontsize=8)
        axes[i, 0].set_title("image" if i == 0 else "", fontsize=8)
        for j, method in enumerate(methods, 1):
            found = {r: (norm, pred, truth) for r, norm, pred, truth in maps[method]}
            ax = axes[i, j]
            ax.imshow(pictures[row])
            if row in found:
                norm, pred, truth = found[row]
                image = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1, alpha=0.55)
                ax.contour(pred.astype(float), levels=[0.5], colors="white", linewidths=0.8)
                ax.contour(truth.astype(float), levels=[0.5], colors="black", linewidths=0.8, linestyles="dashed")
            if i == 0:
                ax.set_title(method, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6,
                     label="map, min–max (white: predicted foreground, black dashed: true mask)")
    fig.suptitle(title, fontsize=9)
    out = Path(path)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
