"""Text and figure of a `clipscope evaluate` result."""

from __future__ import annotations

from pathlib import Path

from clipscope.pipelines.jobs.evaluate.result import Result


def format_evaluation(result: Result) -> str:
    data = result.table().to_pydict()
    base = data["accuracy"][0]
    width = max(len(name) for name in data["ablation"])
    lines = [f"{'ablation':<{width}}  accuracy  change      n"]
    for name, acc, n in zip(data["ablation"], data["accuracy"], data["n"]):
        lines.append(f"{name:<{width}}  {acc:8.4f}  {acc - base:+7.4f}  {n:5d}")
    return "\n".join(lines)


def plot_evaluation(result: Result, path: str | Path, *, title: str = "", chance: float | None = None) -> None:
    """Accuracy against the last mean-ablated layer of the cumulative head ablations, with the
    baseline, MLP, class-token, keep-last-k and head-set ablations as horizontal lines and the
    chance level (`chance`, e.g. 1/classes) as a grey band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = result.table().to_pydict()
    rows = list(zip(data["ablation"], data["kind"], data["layer"], data["accuracy"]))
    curve = [(layer, acc) for _, kind, layer, acc in rows if kind == "cumulative"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([c[0] for c in curve], [c[1] for c in curve], "o-", color="tab:blue",
            label="heads of layers ≤ l mean-ablated")
    styles = {"baseline": ("black", "-"), "mlps": ("tab:orange", "--"), "cls_token": ("tab:green", "--"),
              "mlps+cls_token": ("tab:red", ":"), "keep_last": ("tab:purple", "-."), "heads": ("tab:brown", "-.")}
    for name, kind, _, acc in rows:
        if kind in styles:
            colour, line = styles[kind]
            label = name.replace("keep_last_", "only the last ") + (" layers' heads kept" if kind == "keep_last" else "")
            ax.axhline(acc, color=colour, linestyle=line, label=f"{label} ({acc:.3f})")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=(0, (1, 3)), linewidth=2, label=f"chance ({chance:.3f})")
    ax.set_xlabel("last mean-ablated layer l")
    ax.set_ylabel("zero-shot accuracy")
    ax.set_ylim(0, 1)
    if curve:
        ax.set_xticks([c[0] for c in curve])
    ax.set_title(title or "accumulated mean-ablation of heads")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
