"""Extraction and reduction throughput on Ray (1 and 2 CPU actors) against the in-process pipeline.

On one generated webdataset of 224-px JPEGs, runs `run_extract` in this process (torch with
--threads threads, and with 1 thread) and on an embedded Ray with 1 and 2 one-CPU actors (one torch
thread each, as Ray sets OMP_NUM_THREADS=1), in alternation, best of --rounds, and prints per mode:

* end-to-end images/s: the whole `run_extract` (planning, model load in the driver and in every
  actor, store creation, shards, sample-index merge);
* shard-phase images/s: images / (last shard's end − first shard's start), from timestamps the
  extractor adds to each shard's record — the steady-state rate without the start-up costs;

and the ratios to the in-process run with --threads threads. Then the two store reductions of
`pipelines.jobs.means.job` (`compute_means` over every direct-effect array, `head_statistics` of chosen
layers) as Ray tasks against `map_reduce_local` (with --threads and with 1 thread), in valid rows/s.
Every mode sees the same data; an untimed in-process extraction of one shard warms up first.

    python benchmarks/ray_scaling.py [--model ViT-B-32] [--shards 4] [--images-per-shard 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

from clipscope.cluster.executor import LocalExecutor, RayExecutor  # noqa: E402
from clipscope.cluster.runtime import ray_runtime  # noqa: E402
from clipscope.pipelines.jobs.extract.job import ShardExtractor, ShardTask, run_extract  # noqa: E402
from clipscope.pipelines.jobs.extract.settings import ExtractConfig  # noqa: E402
from clipscope.pipelines.jobs.means.job import compute_means, head_statistics, row_blocks  # noqa: E402
from bench_data import make_dataset  # noqa: E402  (sibling module of this script)
from clipscope.storage.store import RunStore  # noqa: E402


class TimedExtractor(ShardExtractor):
    """Adds wall-clock start and end of each shard to its record (all actors share this clock)."""

    def process(self, task: ShardTask) -> dict:
        started = time.time()
        record = super().process(task)
        return {**record, "bench_start": started, "bench_end": time.time()}


def extract_once(config: ExtractConfig) -> tuple[float, float, int]:
    """(end-to-end seconds, shard-phase seconds, images) of one run into a fresh store."""
    started = time.perf_counter()
    summary = run_extract(config, progress_display="off", extractor_class=TimedExtractor)
    seconds = time.perf_counter() - started
    if not summary.ok:
        raise RuntimeError(f"extraction into {config.out} failed: {summary.failed}")
    records = RunStore.open(config.out).shard_records(stage="extract").values()
    phase = max(r["bench_end"] for r in records) - min(r["bench_start"] for r in records)
    return seconds, phase, summary.images


def best_seconds(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--images-per-shard", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rows-per-chunk", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the in-process run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stat-layers", type=int, nargs="+", default=[8, 9, 10, 11],
                        help="layers of the head_statistics reduction")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpus = os.cpu_count() or 1
    thread_counts = sorted({args.threads, 1}, reverse=True)
    # mode -> (torch threads of this process, extra config); Ray actors compute with one thread each.
    modes = {f"in-process, {t} thr": (t, {}) for t in thread_counts}
    modes["ray, 1 worker"] = (args.threads, {"workers": 1, "address": "auto"})
    modes["ray, 2 workers"] = (args.threads, {"workers": 2})

    with tempfile.TemporaryDirectory(prefix="clipscope-ray-bench-") as tmp:
        paths = make_dataset(tmp, [args.images_per_shard] * args.shards)
        mib = sum(os.path.getsize(p) for p in paths) / 2**20

        def config(out: str, **extra) -> ExtractConfig:
            return ExtractConfig(data=tuple(paths), out=out, model=args.model, batch_size=args.batch,
                                 rows_per_chunk=args.rows_per_chunk, device="cpu", **extra)

        # Ray is started once, before any timing; every Ray mode reuses it.
        with ray_runtime(num_cpus=2, object_store_memory=1024 * 2**20):
            # Untimed warm-up in this process (first forward pass, allocator, page cache).
            run_extract(ExtractConfig(data=(paths[0],), out=os.path.join(tmp, "warm-up.zarr"), model=args.model,
                                      batch_size=args.batch, rows_per_chunk=args.rows_per_chunk, device="cpu"),
                        progress_display="off")
            results: dict[str, list[tuple[float, float, int]]] = {mode: [] for mode in modes}
            for r in range(args.rounds):
                for i, (mode, (threads, extra)) in enumerate(modes.items()):
                    out = os.path.join(tmp, f"store-{r}-{i}.zarr")
                    torch.set_num_threads(threads)
                    results[mode].append(extract_once(config(out, **extra)))
                    if not (r == args.rounds - 1 and i == 0):
                        shutil.rmtree(out)  # keep only the last in-process store, for the reductions
            store = RunStore.open(os.path.join(tmp, f"store-{args.rounds - 1}-0.zarr"))
            rows = int(store.read_valid().sum())
            n_blocks = len(row_blocks(store))
            reductions = {
                "compute_means": lambda executor: compute_means(store, executor=executor),
                f"head_statistics (layers {' '.join(map(str, args.stat_layers))})":
                    lambda executor: head_statistics(store, args.stat_layers, executor=executor),
            }
            # column -> (torch threads of this process, executor)
            local, on_ray = LocalExecutor(progress="off"), RayExecutor(progress="off")
            columns = {**{f"local {t} thr": (t, local) for t in thread_counts}, "ray tasks": (args.threads, on_ray)}
            reduce_seconds: dict[str, dict[str, float]] = {}
            for name, fn in reductions.items():
                fn(local)  # warm-up: page cache, imports in the Ray workers
                fn(on_ray)
                reduce_seconds[name] = {}
                for column, (threads, executor) in columns.items():
                    torch.set_num_threads(threads)
                    reduce_seconds[name][column] = best_seconds(lambda: fn(executor), args.rounds)

    best = {mode: (min(r[0] for r in runs), min(r[1] for r in runs), runs[0][2]) for mode, runs in results.items()}
    base_e2e, base_phase, _ = next(iter(best.values()))
    print(f"torch {torch.__version__}, {cpus} CPU cores (machine shared, load varies); {args.model} random init, "
          f"heads + MLPs, float32; {args.shards} shards x {args.images_per_shard} JPEGs of 224 px ({mib:.1f} MiB); "
          f"batch {args.batch}; {args.rows_per_chunk} rows per chunk; Ray actors 1 CPU / 1 torch thread each; "
          f"best of {args.rounds}")
    print()
    print(f"extraction (ratio = mode / in-process, {args.threads} thr)")
    print(f"{'':24s} {'e2e s':>7s} {'e2e img/s':>10s} {'ratio':>6s} {'shard-phase img/s':>18s} {'ratio':>6s}")
    for mode, (e2e, phase, images) in best.items():
        print(f"{mode:24s} {e2e:7.1f} {images / e2e:10.2f} {base_e2e / e2e:6.2f} {images / phase:18.2f} "
              f"{base_phase / phase:6.2f}")
    print()
    base = next(iter(columns))
    print(f"reductions, valid rows/s ({rows} rows in {n_blocks} row blocks; ratio = ray tasks / {base})")
    print(f"{'':36s}" + "".join(f"{column:>14s}" for column in columns) + f"{'ratio':>8s}")
    for name, seconds in reduce_seconds.items():
        rates = {column: rows / s for column, s in seconds.items()}
        print(f"{name:36s}" + "".join(f"{rate:14.1f}" for rate in rates.values())
              + f"{rates['ray tasks'] / rates[base]:8.2f}")


if __name__ == "__main__":
    main()
