"""Batched OMP against sklearn's orthogonal_mp_gram."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.decomposition import SparseCoder
from sklearn.linear_model import orthogonal_mp_gram

from clipscope.errors import ConfigError
from clipscope.kernels.omp import omp, omp_gram, reference_dictionary


def sklearn_omp(gram: np.ndarray, xy: np.ndarray, m: int, **kw):
    """Coefficients [B, M] and supports in pick order (read off sklearn's coefficient path)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        path = orthogonal_mp_gram(gram, xy.T, n_nonzero_coefs=m, return_path=True, **kw)
        coef = orthogonal_mp_gram(gram, xy.T, n_nonzero_coefs=m, **kw)
    path = path.reshape(gram.shape[0], xy.shape[0], -1)  # sklearn squeezes unit axes away
    coef = coef.reshape(gram.shape[0], -1).T
    supports = []
    for b in range(xy.shape[0]):
        order, seen = [], set()
        for t in range(path.shape[2]):
            new = set(np.flatnonzero(path[:, b, t])) - seen
            assert len(new) <= 1
            order += list(new)
            seen |= new
        supports.append(order)
    return coef, supports


def _dictionary(seed: int, n_atoms=300, dim=64):
    g = np.random.default_rng(seed)
    x = g.normal(size=(n_atoms, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True), g


@pytest.mark.parametrize("m", [1, 4, 8, 32])
def test_matches_sklearn_on_random_normalised_dictionaries(m):
    x, g = _dictionary(m)
    y = g.normal(size=(50, 64))
    gram, xy = x @ x.T, y @ x.T
    coef_ref, support_ref = sklearn_omp(gram, xy, m)
    res = omp_gram(torch.from_numpy(gram), torch.from_numpy(xy), m)
    assert res.support.shape == (50, m)
    assert [list(s) for s in res.support.numpy()] == support_ref
    np.testing.assert_allclose(res.coef.numpy(), coef_ref, rtol=1e-8, atol=1e-10)
    # The dictionary form gives the same answer.
    res2 = omp(torch.from_numpy(x), torch.from_numpy(y), m)
    assert torch.equal(res2.support, res.support)
    np.testing.assert_allclose(res2.coef.numpy(), coef_ref, rtol=1e-8, atol=1e-10)


def test_target_exactly_in_the_span_of_m_atoms():
    x, g = _dictionary(11)
    m = 5
    true_support = np.stack([g.choice(300, size=m, replace=False) for _ in range(20)])
    weights = g.uniform(1.0, 2.0, size=(20, m)) * g.choice([-1.0, 1.0], size=(20, m))
    y = np.einsum("bk,bkd->bd", weights, x[true_support])
    gram, xy = x @ x.T, y @ x.T
    # Asking for more atoms than needed: both stop early once the residual vanishes.
    with pytest.warns(RuntimeWarning):
        coef_ref = orthogonal_mp_gram(gram, xy.T, n_nonzero_coefs=m + 3).T
    res = omp_gram(torch.from_numpy(gram), torch.from_numpy(xy), m + 3)
    np.testing.assert_allclose(res.coef.numpy(), coef_ref, rtol=1e-8, atol=1e-10)
    support = res.support.numpy()
    n_active = (support >= 0).sum(axis=1)
    np.testing.assert_array_equal(n_active, (coef_ref != 0).sum(axis=1))
    assert (n_active < m + 3).all() and (n_active == m).sum() >= 15
    for b in range(20):  # sklearn's return_path breaks on early stops: read its order per target
        _, order = sklearn_omp(gram, xy[b : b + 1], int(n_active[b]))
        assert support[b, : n_active[b]].tolist() == order[0]
        assert (support[b, n_active[b] :] == -1).all()
    np.testing.assert_allclose(res.coef.numpy() @ x, y, atol=1e-12)
    # Where OMP needed exactly m atoms it found the planted ones with the planted weights.
    dense = np.zeros((20, 300))
    np.put_along_axis(dense, true_support, weights, axis=1)
    exact = n_active == m
    np.testing.assert_allclose(res.coef.numpy()[exact], dense[exact], atol=1e-12)


def test_tolerance_mode_matches_sklearn_with_all_atoms_allowed():
    x, g = _dictionary(12, n_atoms=120, dim=32)
    y = g.normal(size=(30, 32))
    gram, xy = x @ x.T, y @ x.T
    norms = (y * y).sum(axis=1)
    tol = 0.35 * float(norms.min())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        coef_ref = orthogonal_mp_gram(gram, xy.T, tol=tol, norms_squared=norms).T
    res = omp_gram(torch.from_numpy(gram), torch.from_numpy(xy), 120, tol=tol, norms_squared=torch.from_numpy(norms))
    np.testing.assert_allclose(res.coef.numpy(), coef_ref, rtol=1e-8, atol=1e-10)
    n_active = (res.support >= 0).sum(dim=1).numpy()
    np.testing.assert_array_equal(n_active, (coef_ref != 0).sum(axis=1))
    assert len(set(n_active.tolist())) > 1  # targets stopped at different steps


def test_blocks_of_targets_give_identical_results():
    x, g = _dictionary(15, n_atoms=100, dim=24)
    y = g.normal(size=(23, 24))
    gram, xy = torch.from_numpy(x @ x.T), torch.from_numpy(y @ x.T)
    norms = torch.from_numpy((y * y).sum(axis=1))
    whole = omp_gram(gram, xy, 10, tol=0.5, norms_squared=norms)
    per_row = 10 * 100 * 8
    for block_bytes in (1, 3 * per_row, 7 * per_row + 5):
        part = omp_gram(gram, xy, 10, tol=0.5, norms_squared=norms, block_bytes=block_bytes)
        assert torch.equal(part.support, whole.support)
        torch.testing.assert_close(part.coef, whole.coef, rtol=1e-12, atol=1e-13)


def test_tie_breaking_follows_sklearns_swapped_order():
    # Twin atoms 2i and 2i+1 make exact ties. sklearn swaps each chosen atom to the front of its
    # working order, which can move a lower twin behind the upper one; the upper twin then wins.
    x, g = _dictionary(13, n_atoms=12, dim=16)
    x = np.repeat(x, 2, axis=0)
    y = g.normal(size=(40, 16))
    gram, xy = x @ x.T, y @ x.T
    odd_picks = 0
    for m in (1, 3, 8):
        coef_ref, support_ref = sklearn_omp(gram, xy, m)
        res = omp_gram(torch.from_numpy(gram), torch.from_numpy(xy), m)
        got = [[a for a in s if a >= 0] for s in res.support.numpy().tolist()]
        assert got == support_ref
        np.testing.assert_allclose(res.coef.numpy(), coef_ref, rtol=1e-8, atol=1e-10)
        odd_picks += sum(a % 2 for s in got for a in s)
    assert odd_picks > 0  # the natural-order rule would only ever pick even atoms


def test_reference_dictionary_and_sparse_coder():
    g = np.random.default_rng(14)
    texts = g.normal(size=(200, 32)) + 0.5
    d = reference_dictionary(torch.from_numpy(texts)).numpy()
    unit = 100.0 * texts / np.linalg.norm(texts, axis=1, keepdims=True)
    centred = unit - unit.mean(axis=0)
    np.testing.assert_allclose(d, 100.0 * centred / np.linalg.norm(centred, axis=0), rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(d, axis=0), 100.0, rtol=1e-12)
    np.testing.assert_allclose(d.mean(axis=0), 0.0, atol=1e-10)
    # The reference decomposes the PCs with SparseCoder(omp) on this dictionary.
    pcs = g.normal(size=(7, 32))
    ref = SparseCoder(dictionary=d, transform_algorithm="omp", transform_n_nonzero_coefs=8, transform_alpha=1e-4)
    res = omp(torch.from_numpy(d), torch.from_numpy(pcs), 8)
    np.testing.assert_allclose(res.coef.numpy(), ref.transform(pcs), rtol=1e-8, atol=1e-10)


def test_validation_errors():
    gram = torch.eye(5, dtype=torch.float64)
    with pytest.raises(ConfigError, match="n_nonzero"):
        omp_gram(gram, torch.ones(2, 5, dtype=torch.float64), 6)
    with pytest.raises(ConfigError, match="xy must have shape"):
        omp_gram(gram, torch.ones(2, 4, dtype=torch.float64), 2)
    with pytest.raises(ConfigError, match="norms_squared"):
        omp_gram(gram, torch.ones(2, 5, dtype=torch.float64), 2, tol=0.1)
    with pytest.raises(ConfigError, match="constant"):
        reference_dictionary(torch.ones(4, 3, dtype=torch.float64))
