"""The README's performance table of the reductions, regenerated from the benchmarks' own output.

Runs `omp_speed.py`, `second_order_norms.py` and `textspan_speed.py` with `--json` (or reads result files
they wrote before, `--from DIR`), and writes one table between the markers
`<!-- perf-table:begin -->` and `<!-- perf-table:end -->` of README.md: per row the size, the baseline
and ours (min / median of the rounds), the ratios, the goal and the asymptotic cost the benchmark printed.
No number is copied by hand.

    python benchmarks/perf_table.py [--quick] [--from DIR] [--readme README.md] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("omp_speed", "second_order_norms", "textspan_speed")
BEGIN, END = "<!-- perf-table:begin -->", "<!-- perf-table:end -->"


def run_all(folder: Path, quick: bool) -> None:
    for name in BENCHMARKS:
        command = [sys.executable, str(HERE / f"{name}.py"), "--json", str(folder / f"{name}.json")]
        print("$", " ".join(command[1:] + (["--quick"] if quick else [])), flush=True)
        subprocess.run(command + (["--quick"] if quick else []), check=True, cwd=HERE)


def fmt(values: list[float], unit: str) -> str:
    if unit == "MiB":
        return f"{values[0]:.1f} MiB"
    return f"{values[0]:.3g} s / {values[1]:.3g} s"


def table(rows: list[dict]) -> str:
    out = ["| reduction | size | baseline (min / median) | ours (min / median) | ratio (min / median) | goal | "
           "cost |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        unit = r.get("unit", "s")
        out.append(f"| {r['reduction']} | {r['size']} | {r['baseline']}: {fmt(r['baseline_s'], unit)} | "
                   f"{r['ours']}: {fmt(r['ours_s'], unit)} | {r['ratio'][0]:.1f}× / {r['ratio'][1]:.1f}× | "
                   f"{r['goal']} | {r['cost']} |")
    return "\n".join(out)


def replace_between(text: str, body: str) -> str:
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"README has no {BEGIN} … {END} section to fill")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{body}\n{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="run each benchmark with --quick")
    parser.add_argument("--from", dest="source", help="read <benchmark>.json files from this folder instead")
    parser.add_argument("--readme", default=str(HERE.parent / "README.md"))
    parser.add_argument("--dry-run", action="store_true", help="print the table, leave README alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.source) if args.source else Path(tmp)
        if not args.source:
            run_all(folder, args.quick)
        rows = [r for name in BENCHMARKS if (folder / f"{name}.json").exists()
                for r in json.loads((folder / f"{name}.json").read_text())]
    if not rows:
        raise SystemExit("no benchmark results to tabulate")
    body = table(rows)
    print(body)
    if not args.dry_run:
        path = Path(args.readme)
        path.write_text(replace_between(path.read_text(), body))
        print(f"wrote {len(rows)} rows into {path}")


if __name__ == "__main__":
    main()
