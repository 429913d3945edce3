"""OMP for every neuron of a layer: batched Gram OMP (kernels.omp) against sklearn, side by side.

Targets: N = 3072 random vectors (the neurons of one ViT-B-32 layer, D = 512). Dictionary: M random unit
vectors (default 5000). Random atoms stand in for text embeddings: OMP's cost does not depend on what the
atoms mean, and no model or pool is needed. The baseline is the reference code's call,
`SparseCoder(dictionary, transform_algorithm="omp", transform_n_nonzero_coefs=m).transform(targets)`
(sklearn forms G = X Xᵀ and X y, then `orthogonal_mp_gram`, one target at a time); ours is
`kernels.omp.omp` (same G and X y, every target at once). Both end to end in float64; supports (as sets)
must be equal and coefficients agree to 1e-8. Best of --rounds each, alternating.

    python benchmarks/omp_speed.py [--sparsity 8 32 128] [--atoms 5000] [--neurons 3072] [--quick]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from sklearn.decomposition import SparseCoder
from threadpoolctl import threadpool_limits

from clipscope.kernels.omp import omp


def sklearn_coef(atoms: np.ndarray, targets: np.ndarray, m: int) -> np.ndarray:
    coder = SparseCoder(dictionary=atoms, transform_algorithm="omp", transform_n_nonzero_coefs=m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # sklearn's early-stop notice
        return coder.transform(targets)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sparsity", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--atoms", type=int, default=5000)
    parser.add_argument("--neurons", type=int, default=3072)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="512 neurons, one round")
    args = parser.parse_args()
    neurons, rounds = (512, 1) if args.quick else (args.neurons, args.rounds)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    atoms = rng.normal(size=(args.atoms, args.dim))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    targets = rng.normal(size=(neurons, args.dim))
    atoms_t, targets_t = torch.from_numpy(atoms), torch.from_numpy(targets)
    print(f"OMP of {neurons} neurons (D={args.dim}) on {args.atoms} random unit atoms, float64, "
          f"{args.threads} threads, best of {rounds}")
    with threadpool_limits(args.threads):
        for m in args.sparsity:
            t_sk, t_ours = [], []
            for _ in range(rounds):
                coef_sk, t = timed(lambda: sklearn_coef(atoms, targets, m))  # noqa: B023
                t_sk.append(t)
                result, t = timed(lambda: omp(atoms_t, targets_t, m))  # noqa: B023
                t_ours.append(t)
            support = result.support.numpy()
            for b in range(neurons):
                if set(np.flatnonzero(coef_sk[b])) != set(support[b][support[b] >= 0]):
                    raise SystemExit(f"m={m}: neuron {b} has another support than sklearn's")
            coef_diff = np.abs(result.coef.numpy() - coef_sk).max()
            if coef_diff > 1e-8:
                raise SystemExit(f"m={m}: coefficients differ from sklearn's by {coef_diff:.2e}")
            print(f"m={m:<4d} sklearn={min(t_sk):8.2f}s  ours={min(t_ours):7.2f}s  "
                  f"ratio sklearn/ours={min(t_sk) / min(t_ours):6.1f}x  supports equal ({neurons} neurons), "
                  f"max |Δcoef|={coef_diff:.1e}")


if __name__ == "__main__":
    main()
