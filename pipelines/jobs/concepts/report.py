"""Text of a `clipscope concepts` result."""

from __future__ import annotations

import numpy as np

from clipscope.pipelines.jobs.concepts.job import ImageConcepts
from clipscope.pipelines.jobs.concepts.result import Result


def format_summary(result: Result, texts: list[str], keys: list[str] | None = None, *, rows: int = 5) -> str:
    """How many neurons are active per image, and the concepts of the first `rows` valid rows."""
    a = result.attrs
    active = result.n_active[result.n_active >= 0]
    tau = f"{a['threshold']}" + (f" (rank {a['rank']})" if a["rank"] else "")
    lines = [f"concepts of layer {a['layer']} over {a['count']} images (OMP m = {a['m']}, pool {a['pool']}, "
             f"threshold {tau})",
             f"  active neurons per image: mean {active.mean():.1f} of {a['n_neurons']} "
             f"({active.mean() / a['n_neurons']:.1%}), max {active.max()}" if active.size else "  no valid rows"]
    for row in np.flatnonzero(result.n_active >= 0)[:rows]:
        found = [f"{texts[i]} ({s:.3g})" for i, s in zip(result.text_index[row], result.score[row]) if i >= 0]
        name = keys[row] if keys else f"row {row}"
        lines.append(f"  {name}: " + (", ".join(found) if found else "—"))
    return "\n".join(lines)


def format_image(found: ImageConcepts, key: str | None = None) -> str:
    """One image's concepts, one per line."""
    head = f"{key or f'row {found.row}'}: {found.n_active} of {found.n_neurons} neurons active"
    return "\n".join([head] + [f"  {s:+.4g}  {t}" for t, s in zip(found.texts, found.score)])
