"""Text of the means job's result (it has no figure)."""

from __future__ import annotations

from clipscope.pipelines.jobs.means.result import Result


def format_means(result: Result) -> str:
    """One line per averaged array: its name, shape and the mean's norm."""
    lines = [f"means over {result.count} valid rows:"]
    for name, mean in result.means.items():
        lines.append(f"  {name} {list(mean.shape)}: ‖mean‖ = {float((mean ** 2).sum() ** 0.5):.4g}")
    return "\n".join(lines)
