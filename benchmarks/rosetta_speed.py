"""Rosetta at scale: accumulation speed, the job against a literal official loop, memory of a tile task.

1. GFLOP/s of the pass-B accumulation (`kernels.rosetta.pair_stats_update`, float64, fixed-shape unit
   blocks) against a plain `torch.matmul` of the same shape in this process, at the thread count the job's
   tasks use (1) and at all threads. FLOPs counted: 2·n·U_a·U_b per update (the product).
2. `clipscope rosetta --score reference --bb-rule reference` against a literal loop of the official code's
   algorithm (per batch: standardise at native size, upsample, full [ΣG × ΣD] table of cosines, averaged;
   then the `universal.py` rule): the time ratio and whether the best-buddy sets are identical.
3. Peak memory of one tile task on a synthetic zoo of ≥ 20,000 anchor units, for several tile sizes
   (each in a fresh process: the peak RSS during the task, Linux VmHWM after a reset): it follows the tile,
   not the number of units.

    python benchmarks/rosetta_speed.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "pipelines", "jobs"))


def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def accumulation_speed(n: int, units: int, threads: int, device: str = "cpu") -> dict:
    from clipscope.kernels.rosetta import empty_pair_stats, pair_stats_update

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n // 196, units, 14, 14, generator=g, dtype=torch.float64).to(device)
    y = torch.randn(n // 196, units, 14, 14, generator=g, dtype=torch.float64).to(device)
    stats = empty_pair_stats(torch.zeros(units, dtype=torch.float64, device=device),
                             torch.zeros(units, dtype=torch.float64, device=device))
    flops = 2.0 * x.shape[0] * 196 * units * units
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def ours():
        pair_stats_update(stats, x, y, unit_block=128)
        sync()

    a = x.permute(0, 2, 3, 1).reshape(-1, units).contiguous()
    b = y.permute(0, 2, 3, 1).reshape(-1, units).contiguous()

    def plain():
        a.T @ b
        sync()

    ours()
    plain()
    t_ours, t_plain = _best(ours), _best(plain)
    return {"threads": threads, "device": device, "samples": int(a.shape[0]), "units": units,
            "ours_gflops": flops / t_ours / 1e9, "matmul_gflops": flops / t_plain / 1e9, "ratio": t_plain / t_ours}


def literal_official(x_layers: list[np.ndarray], y_layers: list[np.ndarray], batch: int) -> np.ndarray:
    """The official two passes over batches with full tables (fp64 here for a like-for-like comparison)."""
    n = x_layers[0].shape[0]
    batches = [slice(s, min(s + batch, n)) for s in range(0, n, batch)]

    def pass1(layers):
        out = []
        for layer in layers:
            means = np.zeros(layer.shape[1])
            variances = np.zeros(layer.shape[1])
            for rows in batches:
                flat = torch.from_numpy(layer[rows]).permute(1, 0, 2, 3).reshape(layer.shape[1], -1)
                means += flat.mean(1).numpy()
                variances += flat.var(1, unbiased=True).numpy()
            out.append((torch.from_numpy(means / len(batches)), torch.from_numpy(np.sqrt(variances / len(batches)))))
        return out

    sx, sy = pass1(x_layers), pass1(y_layers)
    table = torch.zeros(sum(l.shape[1] for l in x_layers), sum(l.shape[1] for l in y_layers), dtype=torch.float64)
    for rows in batches:
        r0 = 0
        for x, (mx, dx) in zip(x_layers, sx):
            c0 = 0
            g_native = (torch.from_numpy(x[rows]) - mx[None, :, None, None]) / (dx[None, :, None, None] + 1e-5)
            for y, (my, dy) in zip(y_layers, sy):
                d = (torch.from_numpy(y[rows]) - my[None, :, None, None]) / (dy[None, :, None, None] + 1e-5)
                size = (max(g_native.shape[2], d.shape[2]), max(g_native.shape[3], d.shape[3]))
                g = F.interpolate(g_native, size=size, mode="bilinear", align_corners=False)
                d = F.interpolate(d, size=size, mode="bilinear", align_corners=False)
                gf = g.permute(1, 0, 2, 3).reshape(g.shape[1], -1)
                df = d.permute(1, 0, 2, 3).reshape(d.shape[1], -1)
                score = (gf @ df.T) / torch.sqrt(torch.outer((gf ** 2).sum(1), (df ** 2).sum(1)))
                table[r0:r0 + g.shape[1], c0:c0 + d.shape[1]] += torch.nan_to_num(score, nan=0.0)
                c0 += d.shape[1]
            r0 += g_native.shape[1]
    return (table / len(batches)).numpy()


def official_buddies(table: np.ndarray, k: int) -> set[tuple[int, int]]:
    """`universal.py`: top-1 forward, kept when the row is in the column's top-k (ties → lower index)."""
    out = set()
    for i in range(table.shape[0]):
        j = int(np.lexsort((np.arange(table.shape[1]), -table[i]))[0])
        if i in np.lexsort((np.arange(table.shape[0]), -table[:, j]))[:k]:
            out.add((i, j))
    return out


def job_vs_official(folder: str, n: int, batch: int, k: int) -> dict:
    from rosetta_helpers import write_maps_store

    from clipscope.cluster.executor import LocalExecutor
    from clipscope.pipelines.jobs import rosetta
    from clipscope.storage.store import RunStore

    g = np.random.default_rng(0)
    anchor = {"g14": g.normal(size=(n, 64, 14, 14)), "g7": g.normal(size=(n, 128, 7, 7))}
    other = {"d28": g.normal(size=(n, 32, 28, 28)), "d7": g.normal(size=(n, 96, 7, 7))}
    anchor["g7"][:, :48] += F.avg_pool2d(torch.from_numpy(other["d28"][:, :32]), 4).numpy().repeat(2, axis=1)[:, :48]
    anchor = {k_: v.astype(np.float32).astype(np.float64) for k_, v in anchor.items()}
    other = {k_: v.astype(np.float32).astype(np.float64) for k_, v in other.items()}
    a_url = write_maps_store(os.path.join(folder, "a.zarr"), anchor, rows_per_chunk=16)
    b_url = write_maps_store(os.path.join(folder, "b.zarr"), other, rows_per_chunk=16)
    settings = rosetta.Settings(others=(b_url,), k=k, self_k=k, bb_rule="reference", score="reference",
                                reference_batch=batch, tile=512)
    began = time.perf_counter()
    result = rosetta.run(RunStore.open(a_url, "r+"), settings, LocalExecutor(progress="off"))
    t_job = time.perf_counter() - began
    pearson = rosetta.Settings(others=(b_url,), name="pearson", k=k, self_k=k, tile=512)
    began = time.perf_counter()
    rosetta.run(RunStore.open(a_url, "r+"), pearson, LocalExecutor(progress="off"))
    t_pearson = time.perf_counter() - began
    began = time.perf_counter()
    table = literal_official(list(anchor.values()), list(other.values()), batch)
    buddies = official_buddies(table, k)
    t_official = time.perf_counter() - began
    ours = {tuple(p) for p in result.arrays["pairs/m1/buddies"].tolist()}
    return {"images": n, "anchor_units": 192, "model_units": 128, "job_s": t_job, "job_pearson_s": t_pearson,
            "official_loop_s": t_official,
            "official_over_job": t_official / t_job, "buddies": len(ours), "identical_buddies": ours == buddies,
            "note": "the job's time includes its self best buddies, tuples and dictionary; the loop's only the table"}


def _tile_memory_child(url_a: str, url_b: str, tile: int) -> None:
    """Run one tile task of the plan and print this process's peak RSS (MiB)."""
    from clipscope.pipelines.jobs.rosetta import job, tiles
    from clipscope.pipelines.jobs.rosetta.sources import open_source
    from clipscope.storage.store import RunStore

    stores = [RunStore.open(url_a, "r"), RunStore.open(url_b, "r")]
    sources = [open_source(s, (), "model") for s in stores]
    valid = stores[0].read_valid()
    blocks = job.row_blocks(valid, stores[0].rows_per_chunk * 4)
    shifts = tuple(np.zeros(s.n_units) for s in sources)
    work = tiles.TileWork(sources[0], tuple(sources), shifts, shifts, tuple(blocks), "pearson", 128, "float64", "cpu")
    plan = job.plan_tiles(sources, tile)
    first = plan[0]
    tiles.tile_task(work, tiles.Tile(0, first.model, 0, first.a_ids[:8], first.b_ids[:8]))  # warm-up, 8 × 8 units
    before = _rss_mib("VmRSS")
    _reset_peak()
    began = time.perf_counter()
    tiles.tile_task(work, plan[0])
    print(json.dumps({"tile": tile, "anchor_units": sources[0].n_units, "tiles": len(plan),
                      "rss_before_mib": before, "peak_mib": _rss_mib("VmHWM"),
                      "task_peak_mib": _rss_mib("VmHWM") - before, "seconds": time.perf_counter() - began}))


def _reset_peak() -> None:
    """Reset the process's peak RSS (Linux: `echo 5 > /proc/self/clear_refs`), so VmHWM measures the task."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def tile_memory(folder: str, layers: int, tiles_: list[int]) -> list[dict]:
    from rosetta_helpers import write_maps_store

    g = np.random.default_rng(1)
    n = 64
    a_url = write_maps_store(os.path.join(folder, "big.zarr"),
                             {f"l{i}": g.normal(size=(n, 2048, 7, 7)).astype(np.float32) for i in range(layers)},
                             rows_per_chunk=16)
    b_url = write_maps_store(os.path.join(folder, "small.zarr"), {"m": g.normal(size=(n, 256, 7, 7))}, rows_per_chunk=16)
    out = []
    for tile in tiles_:
        line = subprocess.run([sys.executable, __file__, "--tile-child", a_url, b_url, str(tile)], check=True,
                              capture_output=True, text=True).stdout.strip().splitlines()[-1]
        out.append(json.loads(line))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller problems")
    parser.add_argument("--json", help="write the numbers to this file")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-speed", action="store_true", help="skip the accumulation-speed part")
    parser.add_argument("--tile-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tile_child:
        _tile_memory_child(args.tile_child[0], args.tile_child[1], int(args.tile_child[2]))
        return
    numbers: dict = {"accumulation": []}
    for threads in ([] if args.skip_speed else sorted({1, os.cpu_count() or 1})):
        numbers["accumulation"].append(accumulation_speed(196 * (20 if args.quick else 50), 512, threads, args.device))
        print(json.dumps(numbers["accumulation"][-1]), flush=True)
    with tempfile.TemporaryDirectory() as folder:
        numbers["official"] = job_vs_official(folder, 60 if args.quick else 200, 10, 5)
        print(json.dumps(numbers["official"]), flush=True)
        numbers["memory"] = tile_memory(folder, 10, [256, 1024, 2048, 20480])
        for line in numbers["memory"]:
            print(json.dumps(line), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(numbers, fh, indent=1)


if __name__ == "__main__":
    main()
