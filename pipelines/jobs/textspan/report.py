"""Text of the textspan job's result (the curve's text and figure: textspan.curve.report)."""

from __future__ import annotations

from clipscope.pipelines.jobs.textspan.result import Result


def format_textspan(result: Result, per_head: int = 5) -> str:
    """Per head: its first picks and the share of the head's variance they explain."""
    lines = []
    data = result.table().to_pydict()
    keys = sorted(set(zip(data["layer"], data["head"])))
    for layer, head in keys:
        idx = [i for i, (l, h) in enumerate(zip(data["layer"], data["head"])) if (l, h) == (layer, head)]
        idx.sort(key=lambda i: data["rank"][i])
        explained = sum(data["explained_ratio"][i] for i in idx)
        shown = "; ".join(data["text"][i] for i in idx[:per_head])
        lines.append(f"L{layer}H{head} ({explained:.0%} of variance in {len(idx)} texts): {shown}")
    return "\n".join(lines)
