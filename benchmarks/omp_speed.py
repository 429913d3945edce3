"""OMP for the neurons of a layer: batched Gram OMP (kernels.omp) against sklearn, side by side.

Targets: N random vectors (neurons' PCs, D = 512). Dictionary: M random unit vectors (default 5000). Random
atoms stand in for text embeddings: OMP's cost does not depend on what the atoms mean. The baseline is the
reference code's call, `SparseCoder(dictionary, transform_algorithm="omp", transform_n_nonzero_coefs=m)
.transform(targets)` (sklearn forms G = X Xᵀ and X y, then `orthogonal_mp_gram` one target at a time, copying
G for each); ours is `kernels.omp.omp` (every target at once; only the picked rows of G are formed). The path
row: `kernels.omp.dictionary_omp_path` at m = 4, 8, …, 128 (every m from one greedy run) against one sklearn
call at m = 128. Both end to end in float64, `--rounds` alternating rounds (min and median printed).
Checked in every round, with raising errors: supports equal to sklearn's (as sets) for every neuron, the
coefficients within 1e-10 relative, and the pick order equal to sklearn's `_gram_omp` on the first 8 neurons.

Cost per target (printed): sklearn M² (its copy of G) + M·m² (the correlations, Σ_k 2·M·k flops) + 2·M²·D/N
(its share of the Gram); ours M·m² (the same correlations, batched; memory bound: 4·M·m² bytes read) +
2·U·M·D/N for the U distinct picked rows of G.

    python benchmarks/omp_speed.py [--sparsity 8 32 128] [--neurons 128 512] [--atoms 5000] [--quick] [--json F]
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
from sklearn.decomposition import SparseCoder
from sklearn.linear_model._omp import _gram_omp
from threadpoolctl import threadpool_limits

from bench_report import line, row, timed, write
from clipscope.kernels.omp import dictionary_omp_path, omp

PATH = (4, 8, 16, 32, 64, 128)


def sklearn_coef(atoms: np.ndarray, targets: np.ndarray, m: int) -> np.ndarray:
    coder = SparseCoder(dictionary=atoms, transform_algorithm="omp", transform_n_nonzero_coefs=m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # sklearn's early-stop notice
        return coder.transform(targets)


def check(atoms: np.ndarray, targets: np.ndarray, m: int, coef_sk: np.ndarray, support: np.ndarray,
          coef: np.ndarray, what: str) -> None:
    for b in range(targets.shape[0]):
        if set(np.flatnonzero(coef_sk[b])) != set(support[b][support[b] >= 0]):
            raise SystemExit(f"{what}: neuron {b} has another support than sklearn's")
    scale = np.abs(coef_sk).max(axis=1, keepdims=True)
    rel = (np.abs(coef - coef_sk) / scale).max()
    if rel > 1e-10:
        raise SystemExit(f"{what}: coefficients differ from sklearn's by {rel:.1e} (relative)")
    gram = atoms @ atoms.T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for b in range(min(8, targets.shape[0])):
            _, idx, n_active = _gram_omp(gram, atoms @ targets[b], m)
            if support[b][support[b] >= 0].tolist() != idx[:n_active].tolist():
                raise SystemExit(f"{what}: neuron {b} picks {support[b]} in another order than sklearn's {idx}")


def cost(m: int, n_atoms: int, dim: int, neurons: int, distinct: int) -> str:
    sk = n_atoms ** 2 + n_atoms * m * m + 2 * n_atoms ** 2 * dim / neurons
    ours = n_atoms * m * m + 2 * distinct * n_atoms * dim / neurons
    return f"flops/neuron sklearn {sk:.2e}, ours {ours:.2e} (U={distinct} rows of G)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sparsity", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--neurons", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--atoms", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="128 neurons only")
    parser.add_argument("--json", help="write the result rows here (for perf_table.py)")
    args = parser.parse_args()
    sizes = [128] if args.quick else args.neurons
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    atoms = rng.normal(size=(args.atoms, args.dim))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    atoms_t = torch.from_numpy(atoms)
    print(f"OMP on {args.atoms} random unit atoms (D={args.dim}), float64, {args.threads} threads, "
          f"{args.rounds} rounds (min/median)")
    rows = []
    with threadpool_limits(args.threads):
        for neurons in sizes:
            targets = rng.normal(size=(neurons, args.dim))
            targets_t = torch.from_numpy(targets)
            for m in args.sparsity:
                t_sk, t_ours = [], []
                for _ in range(args.rounds):
                    coef_sk, t = timed(lambda: sklearn_coef(atoms, targets, m))  # noqa: B023
                    t_sk.append(t)
                    result, t = timed(lambda: omp(atoms_t, targets_t, m))  # noqa: B023
                    t_ours.append(t)
                    check(atoms, targets, m, coef_sk, result.support.numpy(), result.coef.numpy(), f"m={m}")
                distinct = len(np.unique(result.support[:, :-1].numpy()))
                rows.append(row("OMP", f"{neurons} neurons, M={args.atoms}, m={m}", "sklearn", "omp", t_sk, t_ours,
                                cost(m, args.atoms, args.dim, neurons, distinct), "≥ 20x"))
                print(line(rows[-1]), flush=True)
            path = tuple(p for p in PATH if p <= max(args.sparsity))
            t_sk, t_ours = [], []
            for _ in range(args.rounds):
                coef_sk, t = timed(lambda: sklearn_coef(atoms, targets, path[-1]))  # noqa: B023
                t_sk.append(t)
                result, t = timed(lambda: dictionary_omp_path(atoms_t, targets_t, path))  # noqa: B023
                t_ours.append(t)
                support = result.support.numpy()
                dense = np.zeros((neurons, args.atoms + 1))
                np.put_along_axis(dense, np.where(support >= 0, support, args.atoms), result.coef[-1].numpy(), 1)
                check(atoms, targets, path[-1], coef_sk, support, dense[:, :-1], f"path m={path}")
            for i, m in enumerate(path[:-1]):  # every smaller m of the path is sklearn's m-atom solution
                small = np.zeros((neurons, args.atoms + 1))
                np.put_along_axis(small, np.where(support >= 0, support, args.atoms), result.coef[i].numpy(), 1)
                check(atoms, targets, m, sklearn_coef(atoms, targets, m), np.where(np.arange(path[-1]) < m,
                      support, -1), small[:, :-1], f"path at m={m}")
            rows.append(row("OMP path", f"{neurons} neurons, m={path[0]}…{path[-1]} vs one m={path[-1]}", "sklearn",
                            "path", t_sk, t_ours, "one greedy run + one back substitution per m", "≥ 1x"))
            print(line(rows[-1]), flush=True)
    write(args.json, rows)


if __name__ == "__main__":
    main()
