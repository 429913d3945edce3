"""Text of a `clipscope worst-group` result: one row per ablation, the accuracy of every (class, group) cell."""

from __future__ import annotations

import numpy as np

from clipscope.pipelines.jobs.worst_group.result import Result


def format_table(result: Result) -> str:
    a = result.attrs
    cells = [(c, g) for c in range(result.group_count.shape[0]) for g in range(result.group_count.shape[1])
             if result.group_count[c, g] > 0]
    names = [f"{a['classes'][c]}/g{a['groups'][g]} (n={result.group_count[c, g]})" for c, g in cells]
    width = max(len(n) for n in result.ablations) + 2
    lines = [f"zero-shot accuracy per (class, group), {a['task']}; worst group = min over the cells",
             " " * width + "  overall  worst  " + "  ".join(names)]
    acc, worst, overall = result.group_accuracy, result.worst_group, result.accuracy
    for i, name in enumerate(result.ablations):
        row = "  ".join(f"{acc[i, c, g]:>{len(n)}.3f}" for (c, g), n in zip(cells, names))
        lines.append(f"{name:<{width}}  {overall[i]:7.3f}  {worst[i]:5.3f}  {row}")
    if a.get("random"):
        best = a["random"]["best"]
        lines.append(f"random heads ({a['random']['heads']} per set, best of {a['random']['trials']}, seed "
                     f"{a['random']['seed']}): best worst group {worst[result.row(best)]:.3f} ({best})")
    return "\n".join(lines)


def spurious_summary(result: Result) -> dict[str, float]:
    """baseline / chosen heads / best random worst group (the numbers of the spurious-cue table)."""
    worst = result.worst_group
    out = {"baseline": float(worst[result.row("baseline")])}
    chosen = [i for i, k in enumerate(result.attrs["kinds"]) if k in ("heads", "role")]
    if chosen:
        out["chosen"] = float(worst[chosen[0]])
    if result.attrs.get("random"):
        out["random_best"] = float(worst[result.row(result.attrs["random"]["best"])])
    trials = [i for i, k in enumerate(result.attrs["kinds"]) if k == "random"]
    if trials:
        out["random_mean"] = float(np.mean(worst[trials]))
    return out
