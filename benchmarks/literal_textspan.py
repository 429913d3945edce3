"""The literal TextSpan of thesis Alg. 1 (reference-code semantics), row by row on the full data in numpy.

The baseline the benchmarks time `kernels.textspan` against (imported as a sibling script module).
It is written from the algorithm, like the oracle of tests/kernels/test_textspan.py, and kept here so
that benchmarks never import tests.
"""

from __future__ import annotations

import numpy as np


def literal_textspan(c: np.ndarray, texts: np.ndarray, basis_size: int, span_rank: int) -> np.ndarray:
    """Picks (text indices, in pick order) for contributions c [K, D] and a text pool [M, D]."""
    _, _, vh = np.linalg.svd(c, full_matrices=False)
    vh = vh[:span_rank]
    r = texts @ vh.T @ vh  # texts projected onto the top-r right singular vectors of the uncentred C
    c = c - c.mean(axis=0)
    picks = []
    for _ in range(basis_size):
        var = (c @ r.T).var(axis=0, ddof=1)
        var[picks] = -np.inf  # a picked text's residual is 0; never pick it twice
        j = int(np.argmax(var))
        picks.append(j)
        u = r[j] / np.linalg.norm(r[j])
        c = c - np.outer(c @ u, u)
        r = r - np.outer(r @ u, u)
    return np.array(picks)
