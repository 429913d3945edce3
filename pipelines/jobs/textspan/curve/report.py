"""Text and figure of the textspan curve's result."""

from __future__ import annotations

from pathlib import Path

from clipscope.pipelines.jobs.textspan.curve.result import Result


def format_curve(result: Result) -> str:
    lines = [f"zero-shot {result.task} on {result.n_labelled} images, heads of layers {list(result.layers)} "
             f"projected onto their first m TextSpan texts ({result.pool}), everything else mean-ablated:"]
    lines += [f"  m={m:<4d} {acc:.2%}" for m, acc in zip(result.basis_sizes, result.accuracies)]
    lines.append(f"  heads kept whole (no projection): {result.heads_kept_accuracy:.2%}")
    lines.append(f"  full model: {result.baseline_accuracy:.2%}")
    return "\n".join(lines)


def plot_curve(result: Result, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(result.basis_sizes, 100 * result.accuracies, "o-", label="heads projected onto TextSpan texts")
    ax.axhline(100 * result.heads_kept_accuracy, color="tab:green", ls="--", label="heads kept whole")
    ax.axhline(100 * result.baseline_accuracy, color="black", ls=":", label="full model")
    ax.set_xticks(result.basis_sizes)
    ax.set_xlabel("texts per head (m)")
    ax.set_ylabel(f"zero-shot accuracy, {result.task} (%)")
    ax.set_title(f"TextSpan reconstruction, layers {', '.join(map(str, result.layers))}", fontsize=9)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
