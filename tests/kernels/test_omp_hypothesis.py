"""Batched OMP against sklearn's `_gram_omp` (the routine under `orthogonal_mp_gram`), target by target,
over random problems with ties and early stops: picks in order, supports, and coefficients.

Two families:
  * exact problems: atoms are signed, power-of-two multiples of basis vectors (duplicates and negated
    twins included) and targets have small integer entries, so every correlation, Cholesky entry and
    coefficient is exact in float64 whatever the summation order. Equal correlations are then exact
    ties, resolved by sklearn's swapped atom order; the comparison is bit for bit.
  * generic problems: Gaussian unit atoms with duplicated atoms and targets planted in the span of a
    few atoms (early stops: the residual vanishes, or the next atom is dependent), ± tol mode;
    picks equal and coefficients within 1e-10 of the target's largest. Here a tie between exact twins
    is decided by the rounding of their (mathematically equal) correlations, which differs between
    BLAS kernels, so twins are compared folded onto their original atom.
"""

import warnings

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import orthogonal_mp_gram
from sklearn.linear_model._omp import _gram_omp

from clipscope.kernels.omp import dictionary_omp_path, omp, omp_gram, omp_path


def sklearn_picks(gram: np.ndarray, xy: np.ndarray, m: int, tol=None, norms=None):
    """Per target: (picks in order, coefficients in pick order), from sklearn's Gram OMP."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for b in range(xy.shape[0]):
            gamma, idx, n_active = _gram_omp(gram, xy[b], m, None if tol is None else norms[b], tol)
            out.append((idx[:n_active].tolist(), np.asarray(gamma)[:n_active]))
    return out


def sklearn_dense(gram, xy, m, tol=None, norms=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        kw = {"n_nonzero_coefs": m} if tol is None else {"tol": tol, "norms_squared": norms}
        return orthogonal_mp_gram(gram, xy.T, **kw).reshape(gram.shape[0], -1).T


def fold(support: np.ndarray, twin_of: np.ndarray) -> np.ndarray:
    """Picks with each duplicated atom replaced by its original (−1 stays)."""
    return np.where(support >= 0, twin_of[support.clip(0)], -1)


def folded(coef: np.ndarray, twin_of: np.ndarray) -> np.ndarray:
    out = np.zeros_like(coef)
    np.add.at(out, (slice(None), twin_of), coef)
    return out


def check(gram, xy, m, *, rtol, tol=None, norms=None, twin_of=None):
    """Picks in order and coefficients (relative to the target's largest) against sklearn. With `twin_of`,
    duplicated atoms are folded onto their original: which of two exact twins wins follows the rounding of
    their mathematically equal correlations, which no two implementations share."""
    twin_of = np.arange(gram.shape[0]) if twin_of is None else twin_of
    ref = sklearn_picks(gram, xy, gram.shape[0] if tol is not None else m, tol, norms)
    res = omp_gram(torch.from_numpy(gram), torch.from_numpy(xy), m, tol=tol,
                   norms_squared=None if norms is None else torch.from_numpy(norms))
    support, coef = res.support.numpy(), res.coef.numpy()
    for b, (picks, gamma) in enumerate(ref):
        got = support[b, : len(picks)]
        assert fold(got, twin_of).tolist() == fold(np.array(picks, int), twin_of).tolist(), \
            f"target {b}: picks {support[b].tolist()} vs sklearn {picks}"
        assert (support[b, len(picks):] == -1).all()
        scale = max(float(np.abs(gamma).max(initial=0.0)), 1e-300)
        assert np.abs(coef[b, got] - gamma).max(initial=0.0) <= rtol * scale
        off = np.ones(gram.shape[0], bool)
        off[got] = False
        assert (coef[b, off] == 0).all()
    dense = sklearn_dense(gram, xy, m, tol, norms)
    scale = np.maximum(np.abs(dense).max(axis=1, keepdims=True), 1e-300)
    assert (np.abs(folded(coef, twin_of) - folded(dense, twin_of)) <= rtol * scale).all()
    return res


@st.composite
def exact_problems(draw):
    dim = draw(st.integers(2, 6))
    n_atoms = draw(st.integers(dim, 14))
    axis = draw(st.lists(st.integers(0, dim - 1), min_size=n_atoms, max_size=n_atoms))
    scale = draw(st.lists(st.sampled_from([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0]), min_size=n_atoms, max_size=n_atoms))
    x = np.zeros((n_atoms, dim))
    x[np.arange(n_atoms), axis] = scale
    for d in range(dim):  # every coordinate has an atom (the dictionary spans the space)
        if d not in axis:
            x[d] = 0.0
            x[d, d] = 1.0
    n_targets = draw(st.integers(1, 5))
    values = st.integers(-3, 3).map(float)
    y = np.array(draw(st.lists(st.lists(values, min_size=dim, max_size=dim), min_size=n_targets,
                               max_size=n_targets)))
    m = draw(st.integers(1, n_atoms))
    return x, y, m


@settings(max_examples=100, deadline=None)
@given(exact_problems())
def test_exact_problems_with_ties_match_sklearn_bit_for_bit(problem):
    x, y, m = problem
    gram, xy = x @ x.T, y @ x.T
    check(gram, xy, m, rtol=0)
    # the one-pass path and the dictionary form give the same picks and, at every m, sklearn's solution
    sparsities = tuple(range(1, m + 1))
    for path in (omp_path(torch.from_numpy(gram), torch.from_numpy(xy), sparsities),
                 dictionary_omp_path(torch.from_numpy(x), torch.from_numpy(y), sparsities)):
        for i, mi in enumerate(sparsities):
            ref = sklearn_picks(gram, xy, mi)
            for b, (picks, gamma) in enumerate(ref):
                assert path.support[b, : len(picks)].tolist() == picks
                np.testing.assert_array_equal(path.coef[i, b, : len(picks)].numpy(), gamma)
                assert (path.coef[i, b, len(picks):] == 0).all()


@st.composite
def generic_problems(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    g = np.random.default_rng(seed)
    dim = draw(st.integers(3, 12))
    n_atoms = draw(st.integers(dim, 40))
    x = g.normal(size=(n_atoms, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    originals = g.integers(0, n_atoms, size=draw(st.integers(0, 4)))
    x = np.concatenate([x, x[originals]])  # duplicated atoms
    twin_of = np.concatenate([np.arange(n_atoms), originals])
    n_targets = draw(st.integers(1, 6))
    y = g.normal(size=(n_targets, dim))
    planted = draw(st.integers(0, n_targets))
    for b in range(planted):  # targets in the span of 1..3 atoms: the residual vanishes early
        k = int(g.integers(1, 4))
        y[b] = g.uniform(0.5, 2.0, size=k) @ x[g.choice(len(x), size=k, replace=False)]
    m = draw(st.integers(1, len(x)))
    return x, y, m, twin_of


@settings(max_examples=80, deadline=None)
@given(generic_problems(), st.booleans())
def test_generic_problems_with_twins_and_early_stops_match_sklearn(problem, with_tol):
    x, y, m, twin_of = problem
    gram, xy = x @ x.T, y @ x.T
    if with_tol:
        norms = (y * y).sum(axis=1)
        check(gram, xy, gram.shape[0], rtol=1e-10, tol=0.3 * float(norms.mean()), norms=norms, twin_of=twin_of)
    else:
        res = check(gram, xy, m, rtol=1e-10, twin_of=twin_of)
        # The dictionary form (its own X y and lazily formed Gram rows) picks the same atoms, twins folded.
        other = omp(torch.from_numpy(x), torch.from_numpy(y), m)
        np.testing.assert_array_equal(fold(other.support.numpy(), twin_of), fold(res.support.numpy(), twin_of))
        scale = np.maximum(np.abs(res.coef.numpy()).max(axis=1, keepdims=True), 1e-300)
        assert (np.abs(folded(other.coef.numpy(), twin_of) - folded(res.coef.numpy(), twin_of)) <= 1e-10 * scale).all()
