"""Text and figures of a Rosetta result: buddies per model, concepts with their members, the dictionary."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from clipscope.pipelines.jobs.rosetta.result import Result


def format_summary(result: Result, *, max_concepts: int = 20, max_members: int = 6) -> str:
    """A few lines: best buddies per model, tuples, concepts (their members, best r)."""
    a, attrs = result.arrays, result.attrs
    lines = [f"Rosetta {result.settings.name}: {attrs['n_images']} images, K={attrs['k']} ({attrs['bb_rule']} rule), "
             f"score {attrs['score']}, anchor {attrs['inputs'][0]['model'].get('name', attrs['inputs'][0]['url'])}"]
    for m in range(1, len(result.models)):
        label = result.models[m]
        corr = a[f"pairs/{label}/buddy_corr"]
        name = attrs["inputs"][m]["model"].get("name", attrs["inputs"][m]["url"])
        mean = f", mean r {corr.mean():.3f}" if corr.size else ""
        lines.append(f"  {label} ({name}): {len(corr)} best buddies{mean}")
    concepts = a["tuples/concept"]
    lines.append(f"  {len(concepts)} tuples (Eq. 4.4) in {len(set(concepts.tolist()))} concepts; "
                 f"{len(a['self/buddy_corr'])} self best-buddy pairs")
    lines += format_concepts(result, max_concepts=max_concepts, max_members=max_members).splitlines()
    return "\n".join(lines)


def concept_members(result: Result) -> dict[int, list[tuple[str, ...]]]:
    """concept → its tuples as unit descriptions (anchor first)."""
    out: dict[int, list[tuple[str, ...]]] = defaultdict(list)
    for t, c in zip(result.arrays["tuples/members"], result.arrays["tuples/concept"]):
        out[int(c)].append(tuple(result.describe_unit(m, int(u)) for m, u in enumerate(t)))
    return dict(out)


def format_concepts(result: Result, *, max_concepts: int = 20, max_members: int = 6) -> str:
    members = concept_members(result)
    corr = result.arrays["tuples/corr"]
    concept = result.arrays["tuples/concept"]
    lines = []
    for c in sorted(members)[:max_concepts]:
        rs = corr[concept == c]
        tuples = members[c]
        shown = "; ".join(" ↔ ".join(t) for t in tuples[:max_members])
        more = f" (+{len(tuples) - max_members})" if len(tuples) > max_members else ""
        lines.append(f"  concept {c}: {len(tuples)} tuple(s), min r {np.min(rs):.2f}: {shown}{more}")
    if len(members) > max_concepts:
        lines.append(f"  … {len(members) - max_concepts} more concepts")
    return "\n".join(lines)
