"""One OMP run at the largest m gives sklearn's solution at every smaller m (supports and coefficients)."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import orthogonal_mp_gram

from clipscope.errors import ConfigError
from clipscope.kernels.omp import omp_gram, omp_path

from test_omp import sklearn_omp

SPARSITIES = (1, 2, 4, 8, 16)


def sklearn_dense(gram: np.ndarray, xy: np.ndarray, m: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return orthogonal_mp_gram(gram, xy.T, n_nonzero_coefs=m).reshape(gram.shape[0], -1).T


def dense(path, i: int, n_atoms: int) -> np.ndarray:
    """The m_i-atom coefficients of the path as dense [target, atom]."""
    support, coef = path.support.numpy(), path.coef[i].numpy()
    out = np.zeros((support.shape[0], n_atoms + 1))
    np.put_along_axis(out, np.where(support >= 0, support, n_atoms), coef, axis=1)
    return out[:, :n_atoms]


def check_against_sklearn(gram: np.ndarray, xy: np.ndarray, sparsities=SPARSITIES, twin_of=None) -> None:
    """`twin_of[a]`: the atom that atom a duplicates (itself if none). Between exact twins sklearn's
    pick depends on how BLAS rounds their (mathematically equal) correlations, so picks and
    coefficients are compared with each twin folded onto its original."""
    n_atoms = gram.shape[0]
    twin_of = np.arange(n_atoms) if twin_of is None else twin_of
    fold = np.zeros((n_atoms, n_atoms))
    fold[np.arange(n_atoms), twin_of] = 1.0
    path = omp_path(torch.from_numpy(gram), torch.from_numpy(xy), sparsities)
    support = path.support.numpy()
    n_active = (support >= 0).sum(axis=1)
    for i, m in enumerate(sparsities):
        ref = sklearn_dense(gram, xy, m)
        np.testing.assert_allclose(dense(path, i, n_atoms) @ fold, ref @ fold, rtol=1e-9, atol=1e-11)
        # coefficients past m (or past an early stop) are exactly zero
        assert (path.coef[i, :, m:] == 0).all()
        for b in range(xy.shape[0]):  # sklearn's pick order, read off its path target by target
            k = int(min(m, n_active[b]))
            if k:
                _, order = sklearn_omp(gram, xy[b:b + 1], k)
                assert twin_of[support[b, :k]].tolist() == twin_of[order[0]].tolist()
    # the largest m agrees with a direct omp_gram run, supports bit for bit
    direct = omp_gram(torch.from_numpy(gram), torch.from_numpy(xy), sparsities[-1])
    assert torch.equal(direct.support, path.support)
    np.testing.assert_allclose(dense(path, len(sparsities) - 1, gram.shape[0]), direct.coef.numpy(),
                               rtol=1e-9, atol=1e-11)


def test_random_dictionary_every_sparsity_matches_sklearn():
    g = np.random.default_rng(0)
    x = g.normal(size=(120, 24))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = g.normal(size=(15, 24))
    check_against_sklearn(x @ x.T, y @ x.T)


def test_early_stops_ties_and_zero_targets_match_sklearn():
    g = np.random.default_rng(1)
    x = g.normal(size=(30, 12))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = np.concatenate([x, x[:5]])  # exact twins: ties resolved in sklearn's swapped order
    y = np.stack([
        x[3],                                  # one atom: stops after 1 pick
        2.0 * x[7] - 0.5 * x[20],              # two atoms: stops after 2
        np.zeros(12),                          # nothing to explain: no pick at all
        *g.normal(size=(6, 12)),               # generic: stops at rank 12 < 16
        x[0],                                  # a twin pair leads at the first pick: a tie
    ])
    check_against_sklearn(x @ x.T, y @ x.T, twin_of=np.r_[np.arange(30), np.arange(5)])
    path = omp_path(torch.from_numpy(x @ x.T), torch.from_numpy(y @ x.T), SPARSITIES)
    n_active = (path.support >= 0).sum(dim=1).tolist()
    assert n_active[:3] == [1, 2, 0]
    assert all(n <= 12 for n in n_active[3:]) and max(n_active[3:]) >= 11
    assert (path.coef[:, 2] == 0).all()
    # The tie was met: the twin pair 0 / 30 shares the largest correlation of the last target (which of
    # the two wins is BLAS rounding; the fold above compares either), and one of them was picked first.
    corr = np.abs(y[-1] @ x.T)
    assert corr[0] == pytest.approx(corr[30], abs=1e-12) and corr[0] == pytest.approx(corr.max(), abs=1e-12)
    assert path.support[-1, 0].item() in (0, 30)


def test_sparsities_are_validated():
    gram, xy = torch.eye(4, dtype=torch.float64), torch.ones(2, 4, dtype=torch.float64)
    for bad in ((), (2, 1), (1, 1), (1.5,), (True,)):
        with pytest.raises(ConfigError, match="sparsities"):
            omp_path(gram, xy, bad)
    with pytest.raises(ConfigError, match="n_nonzero"):
        omp_path(gram, xy, (5,))
