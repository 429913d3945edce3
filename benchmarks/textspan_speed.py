"""TextSpan per head: the covariance form (kernels.textspan) against the literal algorithm, side by side.

Per K (images), one synthetic head C [K, D] (a decaying spectrum in a random basis, plus a mean, so the
top-r singular subspace is well defined) and a pool of M random unit "texts" (M = 3498, the size of the
thesis's ChatGPT pool). The literal algorithm (benchmarks/literal_textspan.py) runs the thesis's loop on
the rows: an SVD of C, then m rounds of C Rᵀ (O(K·D·M) each). Ours streams ΣC, ΣCᵀC over row blocks
(`textspan_stats`, O(K·D²), done once per store pass and shared by every m) and searches in r coordinates
(`textspan_from_stats`, independent of K). Both in float64; the picks must be identical. The literal
runs once (minutes at K = 20000), ours best of --rounds; on a loaded machine the ratio is only indicative.

    python benchmarks/textspan_speed.py [--sizes 2000 20000] [--quick] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from clipscope.kernels.textspan import merge_stats, textspan_from_stats, textspan_stats
from literal_textspan import literal_textspan


def synthetic_head(rng: np.random.Generator, k: int, d: int) -> np.ndarray:
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    spectrum = 3.0 * 0.97 ** np.arange(d)
    return (rng.normal(size=(k, d)) * spectrum) @ basis.T + rng.normal(size=d)


def ours(c: np.ndarray, texts: torch.Tensor, m: int, r: int, block: int) -> tuple[np.ndarray, float, float]:
    """Picks, seconds for the streamed statistics, seconds for the search."""
    ct = torch.from_numpy(c)
    start = time.perf_counter()
    stats = None
    for lo in range(0, len(c), block):  # as the store reduction sees it: one block at a time
        part = textspan_stats(ct[lo:lo + block], shift=ct[lo])
        stats = part if stats is None else merge_stats(stats, part)
    mid = time.perf_counter()
    picks = textspan_from_stats(stats, texts, basis_size=m, span_rank=r).indices.numpy()
    return picks, mid - start, time.perf_counter() - mid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000], help="K, images per head")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--texts", type=int, default=3498)
    parser.add_argument("-m", "--basis-size", type=int, default=60)
    parser.add_argument("--span-rank", type=int, default=80)
    parser.add_argument("--block", type=int, default=1024, help="rows per streamed block (ours)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="ours: best of this many (the literal runs once)")
    parser.add_argument("--quick", action="store_true", help="K = 2000 only")
    args = parser.parse_args()
    sizes = [2000] if args.quick else args.sizes
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    texts = rng.normal(size=(args.texts, args.dim))
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    texts_t = torch.from_numpy(texts)
    print(f"TextSpan, one head: D={args.dim}, M={args.texts} texts, m={args.basis_size}, r={args.span_rank}, "
          f"float64, {args.threads} threads (torch and numpy BLAS)")
    with threadpool_limits(args.threads):
        for k in sizes:
            c = synthetic_head(rng, k, args.dim)
            ours(c[: 2 * args.span_rank], texts_t, 2, args.span_rank, args.block)  # warm-up
            start = time.perf_counter()
            reference = literal_textspan(c, texts, args.basis_size, args.span_rank)
            t_literal = time.perf_counter() - start
            runs = [ours(c, texts_t, args.basis_size, args.span_rank, args.block) for _ in range(args.rounds)]
            picks = runs[0][0]
            t_stats, t_search = min(r[1] for r in runs), min(r[2] for r in runs)
            if not np.array_equal(picks, reference):
                raise SystemExit(f"K={k}: picks differ from the literal algorithm: {picks} vs {reference}")
            total = t_stats + t_search
            print(f"K={k:<6d} literal={t_literal:8.2f}s  ours: stats={t_stats:6.3f}s search={t_search:6.3f}s "
                  f"total={total:6.3f}s  ratio literal/ours={t_literal / total:7.1f}x  "
                  f"(search alone {t_literal / t_search:7.1f}x)  picks identical ({args.basis_size})")


if __name__ == "__main__":
    main()
