"""Centred second-order norms ‖φ_n − φ̄_n‖² of a layer: the Gram form against materialising φ, side by side.

Shapes of a ViT-B-32 second-order layer: L' = 3 later layers × 12 heads (P = 36 weights per neuron),
N = 3072 neurons, E = 512, over --images images (random q and directions D; the cost does not depend on
the values). Materialised: φ = D_nᵀ(q_n − q̄_n) for every image and neuron ([image, neuron, embed]), then
its squared norm. Gram form: `kernels.neuron_pca.gram_norms` with the per-neuron factors D_nᵀ = U_n T_n
computed once per layer (their one-off cost is printed apart), so a norm is ‖T_n(q_n − q̄_n)‖² (O(P²)
instead of O(P·E), nothing of size image × neuron × embed). Time: float32, best of --rounds, alternating.
Equality: the two float32 results, and both against float64 on the first images. Peak memory: resident
set growth while computing, each method in a fresh subprocess with the same inputs.

    python benchmarks/second_order_norms.py [--images 256] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--later-layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--neurons", type=int, default=3072)
    parser.add_argument("--embed", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peak-child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak_child:
        _peak_child(args.peak_child[0], [int(v) for v in args.peak_child[1:]])
        return
    shape = [args.images, args.later_layers, args.heads, args.neurons, args.embed]
    # Before this process allocates: Linux carries a forked child's peak RSS (ours) across exec.
    mem_mat, mem_gram = peak_mib("materialised", shape, args.threads), peak_mib("gram", shape, args.threads)
    q, q_mean, directions = inputs(*shape)
    start = time.perf_counter()
    factors = neuron_factors(directions)
    t_factors = time.perf_counter() - start
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
        few = slice(0, 8)
        exact = materialised(q[few].double(), q_mean.double(), directions.double())
        ours64 = gram_form(q[few].double(), q_mean.double(), neuron_factors(directions.double()))
        rel64 = ((ours64 - exact).abs() / exact).max().item()
    if rel32 > 1e-4 or rel64 > 1e-10:
        raise SystemExit(f"the Gram form differs from materialised φ: float32 {rel32:.1e}, float64 {rel64:.1e}")
    print(f"centred ‖φ‖² of {args.neurons} neurons × {args.images} images, P={args.later_layers}×{args.heads}, "
          f"E={args.embed}, float32, {args.threads} threads, best of {args.rounds}")
    print(f"time    materialised={min(t_mat):7.3f}s  gram={min(t_gram):7.3f}s  "
          f"ratio={min(t_mat) / min(t_gram):6.1f}x  (factors once per layer: {t_factors:.3f}s)")
    print(f"memory  materialised={mem_mat:7.1f}MiB  gram={mem_gram:7.1f}MiB  "
          f"ratio={mem_mat / max(mem_gram, 1e-3):6.1f}x (peak RSS growth while computing)")
    print(f"equal   max relative difference float32 {rel32:.1e}, float64 (first 8 images) {rel64:.1e}")


if __name__ == "__main__":
    main()
