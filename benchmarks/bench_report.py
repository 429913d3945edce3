"""Shared by the reduction benchmarks: min/median timing and the rows that `perf_table.py` turns into the README table.

A row: {"reduction", "size", "baseline", "ours", "baseline_s": [min, median], "ours_s": [min, median],
"ratio": [min-ratio, median-ratio], "cost", "goal"}. The min ratio is min(baseline) / min(ours), the median
ratio the ratio of the medians. `--json PATH` on a benchmark writes its rows there.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def min_median(times: list[float]) -> list[float]:
    return [min(times), statistics.median(times)]


def row(reduction: str, size: str, baseline: str, ours: str, t_base: list[float], t_ours: list[float],
        cost: str, goal: str) -> dict[str, Any]:
    b, o = min_median(t_base), min_median(t_ours)
    return {"reduction": reduction, "size": size, "baseline": baseline, "ours": ours, "baseline_s": b,
            "ours_s": o, "ratio": [b[0] / o[0], b[1] / o[1]], "cost": cost, "goal": goal}


def line(r: dict[str, Any]) -> str:
    b, o, q = r["baseline_s"], r["ours_s"], r["ratio"]
    if r.get("unit") == "MiB":
        values = f"{r['baseline']}={b[0]:9.1f}MiB  ours={o[0]:7.1f}MiB"
    else:
        values = f"{r['baseline']}={b[0]:8.3f}s/{b[1]:8.3f}s  ours={o[0]:7.3f}s/{o[1]:7.3f}s"
    return (f"{r['reduction']:<28s} {r['size']:<34s} {values}  ratio min/median={q[0]:6.1f}x/{q[1]:6.1f}x  "
            f"(goal {r['goal']})  cost: {r['cost']}")


def write(path: str | None, rows: list[dict[str, Any]]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(rows, indent=1) + "\n")
