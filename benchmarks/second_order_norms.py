"""Centred second-order norms ‖φ_n − φ̄_n‖² of a layer: the Gram form against materialising φ, side by side.

Shapes of a ViT-B-32 second-order layer: L' = 3 later layers × 12 heads (P = 36 weights per neuron),
N = 3072 neurons, E = 512, over --images images (random q and directions D; the cost does not depend on
the values). Materialised: φ = D_nᵀ(q_n − q̄_n) for every image and neuron ([image, neuron, embed]), then
its squared norm. Gram form: `kernels.neuron_pca.gram_norms` with the per-neuron factors D_nᵀ = U_n T_n
computed once per layer, so a norm is ‖T_n(q_n − q̄_n)‖² (P·r instead of P·E multiply-adds, nothing of
size image × neuron × embed: neurons go a cache-sized chunk at a time). Time: float32, `--rounds` alternating
rounds, min and median; the factors' one-off cost (once per layer, shared by every image of the store) is
printed apart and as the ratio with it included. Equality (raising): the two float32 results within float32
rounding, and both against float64 on the first images to 1e-10. Peak memory: resident set growth while
computing, each method in a fresh subprocess with the same inputs.

Cost per image (printed): materialised 2·N·P·E flops and N·E·4 bytes of φ; Gram form 2·N·P·r flops and
N·4 bytes of output (r = min(P, E)).

    python benchmarks/second_order_norms.py [--images 64 256] [--rounds 3] [--threads 2] [--quick] [--json F]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from bench_report import line, min_median, row, write
from clipscope.kernels.neuron_pca import gram_norms, neuron_factors


def inputs(images: int, later: int, heads: int, neurons: int, embed: int):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(images, neurons, later * heads, generator=g)
    directions = torch.randn(neurons, later * heads, embed, generator=g) / embed ** 0.5
    return q, q.mean(0), directions


def materialised(q, q_mean, directions):
    phi = torch.einsum("bnp,npe->bne", q - q_mean, directions)
    return (phi * phi).sum(-1)


def gram_form(q, q_mean, factors):
    return gram_norms(q, factors=factors, q_mean=q_mean)


def _peak_child(method: str, shape: list[int]) -> None:
    q, q_mean, directions = inputs(*shape)
    factors = neuron_factors(directions) if method == "gram" else None
    if method == "gram":  # warm the thread pool and BLAS buffers outside the measurement, as for both
        gram_form(q[:1], q_mean, factors)
    else:
        materialised(q[:1], q_mean, directions)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if method == "gram":
        gram_form(q, q_mean, factors)
    else:
        materialised(q, q_mean, directions)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_kib": after, "baseline_kib": before}))


def peak_mib(method: str, shape: list[int], threads: int) -> float:
    run = subprocess.run([sys.executable, __file__, "--threads", str(threads), "--peak-child", method,
                          *map(str, shape)], capture_output=True, text=True, check=True)
    data = json.loads(run.stdout.strip().splitlines()[-1])
    return (data["peak_kib"] - data["baseline_kib"]) / 1024


def measure(images: int, args) -> list[dict]:
    shape = [images, args.later_layers, args.heads, args.neurons, args.embed]
    # Before this process allocates: Linux carries a forked child's peak RSS (ours) across exec.
    mem_mat, mem_gram = peak_mib("materialised", shape, args.threads), peak_mib("gram", shape, args.threads)
    # The Gram form's growth can fall under the resolution of the peak RSS (its temporaries are a few MiB,
    # reused): count at least its output, [image, neuron] float32, which it must hold.
    mem_gram = max(mem_gram, images * args.neurons * 4 / 2**20)
    q, q_mean, directions = inputs(*shape)
    t_factors = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        factors = neuron_factors(directions)
        t_factors.append(time.perf_counter() - start)
    p, e, n = args.later_layers * args.heads, args.embed, args.neurons
    r = factors.coords.shape[1]
    with torch.inference_mode():
        t_mat, t_gram = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            ref = materialised(q, q_mean, directions)
            t_mat.append(time.perf_counter() - start)
            start = time.perf_counter()
            ours = gram_form(q, q_mean, factors)
            t_gram.append(time.perf_counter() - start)
            rel32 = ((ours - ref).abs() / ref).max().item()
            if rel32 > 1e-4:
                raise SystemExit(f"the Gram form differs from materialised φ by {rel32:.1e} (float32)")
        few = slice(0, 8)
        exact = materialised(q[few].double(), q_mean.double(), directions.double())
        ours64 = gram_form(q[few].double(), q_mean.double(), neuron_factors(directions.double()))
        rel64 = ((ours64 - exact).abs() / exact).max().item()
    if rel64 > 1e-10:
        raise SystemExit(f"the Gram form differs from materialised φ in float64 by {rel64:.1e}")
    size = f"{n} neurons × {images} images"
    cost = (f"per image: materialised {2 * n * p * e:.1e} flops, {n * e * 4 / 2**20:.1f} MiB of φ; "
            f"Gram {2 * n * p * r:.1e} flops, {n * 4 / 2**10:.0f} KiB")
    rows = [row("second-order norms (time)", size, "materialised", "gram", t_mat, t_gram, cost, "≥ 10x"),
            row("second-order norms (time, with factors)", size, "materialised", "gram+factors", t_mat,
                [a + b for a, b in zip(t_gram, t_factors, strict=True)],
                f"factors once per layer: {min_median(t_factors)[0]:.3f}s (2·N·E·P² flops)", "—"),
            {**row("second-order norms (memory)", size, "materialised", "gram", [mem_mat], [mem_gram],
                   "peak RSS growth while computing (ours: at least its output)", "≥ 10x"), "unit": "MiB"}]
    print(f"{size}: equal to float32 rounding (max rel {rel32:.1e}), float64 (first 8 images) {rel64:.1e}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--later-layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--neurons", type=int, default=3072)
    parser.add_argument("--embed", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="64 images only")
    parser.add_argument("--json", help="write the result rows here (for perf_table.py)")
    parser.add_argument("--peak-child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak_child:
        _peak_child(args.peak_child[0], [int(v) for v in args.peak_child[1:]])
        return
    print(f"centred ‖φ‖², P={args.later_layers}×{args.heads}, E={args.embed}, float32, {args.threads} threads, "
          f"{args.rounds} rounds (min/median)")
    rows = []
    for images in [64] if args.quick else args.images:
        for r in measure(images, args):
            rows.append(r)
            print(line(r), flush=True)
    write(args.json, rows)


if __name__ == "__main__":
    main()
