"""Text and figure of the roles job: a table per head, the two scores, and the head × property heat map."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clipscope.pipelines.jobs.roles.result import Result


def format_roles(result: Result) -> str:
    """The scores, then one line per head: its label, matching texts and property shares."""
    n = result.label.size
    association = "n/a (no text tags)" if result.association != result.association else f"{result.association:.3f}"
    lines = [f"heads of layers {', '.join(map(str, result.layers))} ({n} heads; tags: {result.tags}; top "
             f"{result.settings.m} TextSpan texts per head, association needs ≥ {result.settings.min_match})",
             f"  entanglement {result.entanglement:.3f} (1 − distinct labels / heads; 0 = every head its own property), "
             f"shared {result.entanglement_shared:.3f} (heads whose label another head shares)",
             f"  association {association} (heads with ≥ {result.settings.min_match} of their texts on their label)"]
    for i, layer in enumerate(result.layers):
        for head in range(result.label.shape[1]):
            shares = ", ".join(f"{p} {result.share[i, head, j]:.0%}" for j, p in enumerate(result.properties)
                               if result.share[i, head, j] >= 0.005)
            matches = result.matches[i, head]
            lines.append(f"  L{layer}H{head}: {result.label_of(layer, head):10s}"
                         f"{'' if matches < 0 else f' {matches}/{result.settings.m} texts'}  ({shares or '—'})")
    return "\n".join(lines)


def plot_roles(result: Result, path: str | Path) -> Path:
    """Head × property heat map of the TextSpan variance share, each head's label marked with a box."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = [(l, h) for l in result.layers for h in range(result.label.shape[1])]
    grid = np.stack([result.share[result.layers.index(l), h] for l, h in heads]) if heads else np.zeros((0, 0))
    fig, ax = plt.subplots(figsize=(1.2 * len(result.properties) + 2.5, 0.28 * len(heads) + 1.6))
    image = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=0, vmax=max(float(grid.max(initial=0)), 1e-9))
    for row, (l, h) in enumerate(heads):
        label = int(result.label[result.layers.index(l), h])
        if label >= 0:
            ax.add_patch(plt.Rectangle((label - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="white", lw=1.5))
    ax.set_xticks(range(len(result.properties)), result.properties, rotation=30, ha="right")
    ax.set_yticks(range(len(heads)), [f"L{l}H{h}" for l, h in heads], fontsize=7)
    ax.set_xlabel("property (texts tagged with it)")
    ax.set_ylabel("head (layer, head)")
    fig.colorbar(image, ax=ax, label="share of the head's variance (TextSpan)")
    ax.set_title(f"Head roles (box: the head's label)\nentanglement {result.entanglement:.2f}, "
                 f"association {result.association:.2f}", fontsize=9)
    out = Path(path)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
