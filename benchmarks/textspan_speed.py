"""TextSpan of one layer's heads from a store: the official loop on raw C against the stored statistics.

A store is written with one layer of head terms of ViT-B-32's shape (12 heads, D = 512) over K images (a
decaying spectrum in a random basis per head, plus a mean, so the top-r singular subspace is well
defined), in shards with done records, as an extraction leaves it. A pool of M random unit "texts".
  * official: per head, read C [K, D] from the store and run the thesis's loop on the rows
    (benchmarks/literal_textspan.py: an SVD of C, then m rounds of C Rᵀ, O(K·D·M) each);
  * first run: `stored_head_statistics` streams the rows once (ΣC, ΣCᵀC, K per head, O(K·D²)), stores them,
    and the search runs in r coordinates (`textspan_from_stats`, independent of K);
  * stored: the statistics are in the store: a second search (another pool, another m) reads them back,
    no row is read (the statistics group is removed before each first-run round).
Both in float64 on the raw head terms (normalize off, the official loop's C); picks must be identical
(raising) in every round; each side's time includes reading its inputs from the store. `--rounds` rounds, min and median.

Cost (printed): official 2·K·D·M·m + K·D² (SVD) flops per head; first run K·D² per head once + the search
(D³ + M·D·r + m·(M·r + r²)); stored: the search only, 8·D² bytes read per head.

    python benchmarks/textspan_speed.py [--sizes 5000 20000] [--texts 300] [-m 10] [--quick] [--json F]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from bench_report import line, row, timed, write
from clipscope.kernels.textspan import textspan_from_stats
from clipscope.pipelines.jobs.textspan.statistics import group, stored_head_statistics
from clipscope.storage.layout import ArraySpec
from clipscope.storage.store import RunStore
from literal_textspan import literal_textspan

LAYER, HEADS = 11, 12


def build_store(path: str, k: int, dim: int, shards: int, rng: np.random.Generator) -> RunStore:
    rows_per_chunk = 256
    per_shard = -(-k // shards // rows_per_chunk) * rows_per_chunk
    blocks = [[s * per_shard, per_shard] for s in range(shards)]
    store = RunStore.create(path, arrays=[ArraySpec("direct/heads", ("sample", "layer", "head", "embed"),
                                                    (1, HEADS, dim), "float32"),
                                          ArraySpec("image_embedding", ("sample", "embed"), (dim,), "float32")],
                            n_rows=per_shard * shards, rows_per_chunk=rows_per_chunk,
                            attrs={"model": {"name": "synthetic"}, "layers": {"heads": [LAYER]},
                                   "row_blocks": blocks, "shards": [f"synthetic-{s}" for s in range(shards)]})
    bases = [np.linalg.qr(rng.normal(size=(dim, dim)))[0] for _ in range(HEADS)]
    spectrum = 3.0 * 0.97 ** np.arange(dim)
    offsets = rng.normal(size=(HEADS, dim))
    left = k
    for s, (start, capacity) in enumerate(blocks):
        n = min(capacity, left)
        left -= n
        heads = np.zeros((capacity, 1, HEADS, dim), np.float32)
        for h in range(HEADS):
            heads[:n, 0, h] = (rng.normal(size=(n, dim)) * spectrum) @ bases[h].T + offsets[h]
        valid = np.arange(capacity) < n
        store.write_rows(start, {"direct/heads": heads, "image_embedding": heads.sum(axis=(1, 2))}, valid)
        store.mark_shard_done(s, {"url": f"synthetic-{s}", "count": n, "valid": n, "errors": 0, "seconds": 0.0,
                                  "checksum": store.rows_checksum(start, capacity)})
    return RunStore.open(path, "r+")


def official(store: RunStore, texts: np.ndarray, m: int, r: int) -> list[np.ndarray]:
    valid = store.read_valid()
    heads = store.read("direct/heads")[valid][:, 0].astype(np.float64)
    return [literal_textspan(heads[:, h], texts, m, r) for h in range(HEADS)]


def ours(store: RunStore, texts: torch.Tensor, m: int, r: int) -> list[np.ndarray]:
    stats = stored_head_statistics(store, [LAYER], normalize=False)[0]
    return [textspan_from_stats(s, texts, basis_size=m, span_rank=r).indices.numpy() for s in stats]


def check(got: list[np.ndarray], expected: list[np.ndarray], what: str) -> None:
    for h, (a, b) in enumerate(zip(got, expected, strict=True)):
        if not np.array_equal(a, b):
            raise SystemExit(f"{what}: head {h} picks {a.tolist()}, the official loop {b.tolist()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000], help="K, images")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--texts", type=int, default=300)
    parser.add_argument("-m", "--basis-size", type=int, default=10)
    parser.add_argument("--span-rank", type=int, default=80)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="K = 5000 only")
    parser.add_argument("--json", help="write the result rows here (for perf_table.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(2 * args.texts, args.dim))
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    first_pool, second_pool = pool[: args.texts], pool[args.texts:]
    m, r, d, n_texts = args.basis_size, args.span_rank, args.dim, args.texts
    print(f"TextSpan of {HEADS} heads (one layer), D={d}, M={n_texts} texts, m={m}, r={r}, float64, "
          f"{args.threads} threads, {args.rounds} rounds (min/median)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(args.threads):
        for k in [5000] if args.quick else args.sizes:
            store = build_store(str(Path(tmp) / f"k{k}"), k, d, args.shards, rng)
            stats_dir = Path(tmp) / f"k{k}" / group(LAYER, False)
            t_official, t_first, t_stored, t_official2 = [], [], [], []
            for _ in range(args.rounds):
                expected, t = timed(lambda: official(store, first_pool, m, r))  # noqa: B023
                t_official.append(t)
                shutil.rmtree(stats_dir, ignore_errors=True)
                store = RunStore.open(store.url, "r+")
                got, t = timed(lambda: ours(store, torch.from_numpy(first_pool), m, r))  # noqa: B023
                t_first.append(t)
                check(got, expected, f"K={k} first run")
                # the statistics are stored now: another pool and another m read them back
                got, t = timed(lambda: ours(store, torch.from_numpy(second_pool), m - 1, r))  # noqa: B023
                t_stored.append(t)
                expected, t = timed(lambda: official(store, second_pool, m - 1, r))  # noqa: B023
                t_official2.append(t)
                check(got, expected, f"K={k} from stored statistics")
            search = d ** 3 + n_texts * d * r + m * (n_texts * r + r * r)
            cost_official = f"flops/head {2 * k * d * n_texts * m + k * d * d:.1e}"
            rows.append(row("TextSpan (first run)", f"{HEADS} heads, K={k}, M={n_texts}, m={m}", "official",
                            "stats+search", t_official, t_first,
                            f"{cost_official}; ours {k * d * d + search:.1e} (K·D² once + search)", "≥ 20x"))
            print(line(rows[-1]), flush=True)
            rows.append(row("TextSpan (statistics stored)", f"{HEADS} heads, K={k}, M={n_texts}, m={m - 1}",
                            "official", "search", t_official2, t_stored,
                            f"{cost_official}; ours {search:.1e} (search, K-independent; {8 * d * d} B/head read)",
                            "≥ 200x"))
            print(line(rows[-1]), flush=True)
    write(args.json, rows)


if __name__ == "__main__":
    main()
