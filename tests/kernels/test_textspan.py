"""TextSpan from sufficient statistics against the literal algorithm (thesis Alg. 1)."""

import numpy as np
import pytest
import torch

from clipscope.errors import ConfigError, DataError
from clipscope.kernels.textspan import (
    TextSpanStats,
    merge_stats,
    textspan,
    textspan_from_stats,
    textspan_stats,
)


def literal_textspan(c: np.ndarray, r: np.ndarray, m: int, rank: int):
    """The reference algorithm, row by row on the full data (the test oracle)."""
    _, _, vh = np.linalg.svd(c, full_matrices=False)
    vh = vh[:rank]
    r = r @ vh.T @ vh
    c = c - c.mean(axis=0)
    picks, variances, basis = [], [], []
    for _ in range(m):
        var = (c @ r.T).var(axis=0, ddof=1)
        j = int(np.argmax(var))
        picks.append(j)
        variances.append(var[j])
        basis.append(r[j].copy())
        u = r[j] / np.linalg.norm(r[j])
        c = c - np.outer(c @ u, u)
        r = r - np.outer(r @ u, u)
    return np.array(picks), np.array(variances), np.stack(basis), c


def _data(seed: int, k=2000, d=64, m=500, low_rank: int | None = None, mean_scale=0.0):
    g = np.random.default_rng(seed)
    if low_rank is None:
        c = g.normal(size=(k, d)) * g.uniform(0.2, 3.0, size=d)
    else:
        c = g.normal(size=(k, low_rank)) @ g.normal(size=(low_rank, d)) + 0.05 * g.normal(size=(k, d))
    c = c + mean_scale * g.normal(size=d)
    r = g.normal(size=(m, d))
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    return c, r


@pytest.mark.parametrize(
    "case",
    [
        dict(seed=0, rank=40, k=2000),
        dict(seed=1, rank=64, k=1000),  # r = D
        dict(seed=2, rank=200, k=1000),  # r > D: capped
        dict(seed=3, rank=40, k=1000, low_rank=8),
        dict(seed=4, rank=40, k=1000, mean_scale=50.0),
    ],
)
def test_picks_match_literal(case):
    c, r = _data(case["seed"], k=case["k"], low_rank=case.get("low_rank"), mean_scale=case.get("mean_scale", 0.0))
    m, rank = 20, case["rank"]
    picks, variances, basis, residual_c = literal_textspan(c, r, m, rank)
    res = textspan(torch.from_numpy(c), torch.from_numpy(r), basis_size=m, span_rank=rank)
    np.testing.assert_array_equal(res.indices.numpy(), picks)
    np.testing.assert_allclose(res.variances.numpy(), variances, rtol=1e-8)
    np.testing.assert_allclose(res.basis.numpy(), basis, rtol=1e-7, atol=1e-9)
    assert len(set(picks.tolist())) == m
    # The explained variances account for exactly what the literal algorithm removed from C.
    centred = c - c.mean(axis=0)
    total = centred.var(axis=0, ddof=1).sum()
    residual = residual_c.var(axis=0, ddof=1).sum()
    np.testing.assert_allclose(float(res.total_variance), total, rtol=1e-10)
    np.testing.assert_allclose(float(res.residual_variance[-1]), residual, rtol=1e-9)
    np.testing.assert_allclose(res.explained_ratio.sum().item(), (total - residual) / total, rtol=1e-9)
    gram = res.directions @ res.directions.T
    np.testing.assert_allclose(gram.numpy(), np.eye(m), atol=1e-10)


def test_float32_contributions_are_accumulated_in_float64():
    c, r = _data(5, k=600, d=32, m=100)
    picks, variances, _, _ = literal_textspan(c.astype(np.float32).astype(np.float64), r, 10, 20)
    res = textspan(torch.from_numpy(c).float(), torch.from_numpy(r), basis_size=10, span_rank=20)
    assert res.variances.dtype == torch.float64
    np.testing.assert_array_equal(res.indices.numpy(), picks)
    np.testing.assert_allclose(res.variances.numpy(), variances, rtol=1e-8)


def test_streamed_blocks_merge_in_any_order():
    c, r = _data(6)
    ct = torch.from_numpy(c)
    g = np.random.default_rng(7)
    cuts = np.sort(g.choice(np.arange(1, len(c)), size=6, replace=False))
    blocks = np.split(np.arange(len(c)), cuts)
    assert len(blocks) == 7 and len({len(b) for b in blocks}) > 1
    # Blocks use different shifts (their own first row or none) to exercise rebasing.
    parts = [
        textspan_stats(ct[idx], shift=ct[idx[0]] if i % 2 else None) for i, idx in enumerate(blocks)
    ]
    order = g.permutation(len(parts))
    merged = parts[order[0]]
    for i in order[1:]:
        merged = merge_stats(merged, parts[i])
    one_shot = textspan_stats(ct)
    merged0 = merged.rebased(torch.zeros(c.shape[1], dtype=torch.float64))
    assert merged.count == len(c)
    np.testing.assert_allclose(merged0.sum.numpy(), one_shot.sum.numpy(), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(merged0.gram.numpy(), one_shot.gram.numpy(), rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(merged.mean.numpy(), c.mean(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(merged.covariance().numpy(), np.cov(c, rowvar=False), rtol=1e-9, atol=1e-12)
    # A tree reduce (pairs, then pairs of pairs) gives the same picks as the literal algorithm.
    level = [parts[i] for i in order]
    while len(level) > 1:
        level = [merge_stats(*level[i : i + 2]) if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
    picks, variances, _, _ = literal_textspan(c, r, 20, 40)
    res = textspan_from_stats(level[0], torch.from_numpy(r), basis_size=20, span_rank=40)
    np.testing.assert_array_equal(res.indices.numpy(), picks)
    np.testing.assert_allclose(res.variances.numpy(), variances, rtol=1e-8)


def test_ties_go_to_the_lowest_index_and_picks_never_repeat():
    c, r = _data(8, k=300, d=16, m=40)
    r = np.concatenate([r, r[:5]])  # exact duplicates of texts 0..4 at 40..44
    res = textspan(torch.from_numpy(c), torch.from_numpy(r), basis_size=12, span_rank=16)
    picks = res.indices.tolist()
    assert len(set(picks)) == 12
    assert not any(p >= 40 for p in picks)  # a duplicate never beats its lower-index twin
    picks_lit, _, _, _ = literal_textspan(c, r, 12, 16)
    assert picks == picks_lit.tolist()


def test_reconstruction_is_the_orthogonal_projection_onto_the_picks():
    c, r = _data(9, k=500, d=24, m=80)
    res = textspan(torch.from_numpy(c), torch.from_numpy(r), basis_size=6, span_rank=24)
    # The picks' directions span what the literal algorithm removed: mean + least-squares projection
    # of the centred rows onto the basis rows is the literal algorithm's reconstruction.
    b, mean = res.basis.numpy(), res.mean.numpy()
    coef, *_ = np.linalg.lstsq(b.T, (c - mean).T, rcond=None)
    recon = mean + (b.T @ coef).T
    centred = c - c.mean(axis=0)
    _, _, _, residual = literal_textspan(c, r, 6, 24)
    np.testing.assert_allclose(recon, c - residual, rtol=1e-9, atol=1e-9)
    assert np.abs(centred - residual).max() > 0.1  # the projection is not trivial


def test_validation_errors():
    c, r = _data(10, k=50, d=8, m=20)
    stats = textspan_stats(torch.from_numpy(c))
    with pytest.raises(ConfigError, match="basis_size"):
        textspan_from_stats(stats, torch.from_numpy(r), basis_size=9, span_rank=8)
    with pytest.raises(ConfigError, match="embed dim"):
        textspan_from_stats(stats, torch.from_numpy(r[:, :4]), basis_size=2)
    with pytest.raises(ConfigError, match="span_rank"):
        textspan_from_stats(stats, torch.from_numpy(r), basis_size=2, span_rank=0)
    one = textspan_stats(torch.from_numpy(c[:1]))
    with pytest.raises(DataError, match="at least 2"):
        textspan_from_stats(one, torch.from_numpy(r), basis_size=1)
    # Texts with no component in the span of C cannot be picked.
    c_flat = np.zeros((50, 8))
    c_flat[:, :2] = np.random.default_rng(0).normal(size=(50, 2))
    r_off = np.zeros((3, 8))
    r_off[0, 0], r_off[1, 5], r_off[2, 6] = 1.0, 1.0, 1.0
    with pytest.raises(DataError, match="ran out"):
        textspan(torch.from_numpy(c_flat), torch.from_numpy(r_off), basis_size=2, span_rank=2)
    assert isinstance(stats, TextSpanStats)
