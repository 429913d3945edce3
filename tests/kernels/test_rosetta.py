"""Rosetta statistics against naive np.corrcoef; best buddies, merging and clustering."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipscope.errors import ConfigError
from clipscope.kernels.rosetta import (
    best_buddies,
    cluster_units,
    empty_pair_stats,
    init_pair_stats,
    merge_pair_stats,
    pair_stats_update,
    pearson,
    rosetta_units,
    self_best_buddies,
    unit_tiles,
)


def _maps(g, n, u, h, w, mean=1e4, std=0.1):
    base = g.normal(size=(n, u, h, w)) * std
    return base + mean + g.normal(size=(1, u, 1, 1)) * 10  # per-unit offsets around a large mean


def naive_corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Resize to the larger size, flatten images × positions, np.corrcoef, cross block."""
    size = (max(x.shape[2], y.shape[2]), max(x.shape[3], y.shape[3]))

    def flat(m):
        t = torch.from_numpy(m)
        if tuple(t.shape[2:]) != size:
            t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
        return t.permute(1, 0, 2, 3).reshape(m.shape[1], -1).numpy()

    fx, fy = flat(x), flat(y)
    return np.corrcoef(np.concatenate([fx, fy]))[: len(fx), len(fx) :]


def _stream(x, y, batches, **kw):
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    stats = init_pair_stats(xt[batches[0]], yt[batches[0]], **kw)
    for b in batches:
        stats = pair_stats_update(stats, xt[b], yt[b])
    return stats


@pytest.mark.parametrize("shapes", [((7, 7), (14, 14)), ((6, 9), (8, 5)), ((5, 5), (5, 5))])
def test_pearson_matches_naive_corrcoef_with_large_mean(shapes):
    g = np.random.default_rng(0)
    (h1, w1), (h2, w2) = shapes
    x = _maps(g, 30, 5, h1, w1)
    y = _maps(g, 30, 4, h2, w2)
    planted = np.asarray(F.interpolate(torch.from_numpy(x[:, :2]), size=(h2, w2), mode="bilinear"))
    y[:, :2] += planted - planted.mean(axis=(0, 2, 3), keepdims=True)
    batches = np.array_split(np.arange(30), [4, 11, 23])
    stats = _stream(x, y, batches)
    assert stats.count == 30 * max(h1, h2) * max(w1, w2)
    ref = naive_corr(x, y)
    np.testing.assert_allclose(pearson(stats).numpy(), ref, rtol=0, atol=1e-10)
    assert np.abs(ref[:2, :2]).max() > 0.1  # the planted correlation is there
    # Without the shift the same float64 sums lose the variance to cancellation.
    unshifted = empty_pair_stats(torch.zeros(5, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
    for b in batches:
        unshifted = pair_stats_update(unshifted, torch.from_numpy(x[b]), torch.from_numpy(y[b]))
    assert np.abs(pearson(unshifted).numpy() - ref).max() > 1e-8


def test_merge_is_order_independent_and_equals_streaming():
    g = np.random.default_rng(1)
    x = _maps(g, 40, 6, 4, 4)
    y = _maps(g, 40, 3, 8, 8)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    batches = np.array_split(np.arange(40), [3, 10, 18, 31])
    # Each worker fixes its own shift from its own first batch.
    parts = [pair_stats_update(init_pair_stats(xt[b], yt[b]), xt[b], yt[b]) for b in batches]
    ref = naive_corr(x, y)
    results = []
    for perm in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1], [3, 4, 1, 0, 2]):
        merged = parts[perm[0]]
        for i in perm[1:]:
            merged = merge_pair_stats(merged, parts[i])
        results.append(pearson(merged).numpy())
        np.testing.assert_allclose(results[-1], ref, atol=1e-10)
    left = merge_pair_stats(parts[0], parts[1])
    right = merge_pair_stats(parts[2], merge_pair_stats(parts[3], parts[4]))
    tree = merge_pair_stats(left, right)
    np.testing.assert_allclose(pearson(tree).numpy(), results[0], atol=1e-12)
    np.testing.assert_allclose(results[1], results[0], atol=1e-12)
    np.testing.assert_allclose(pearson(_stream(x, y, batches)).numpy(), results[0], atol=1e-12)


def test_tiles_assemble_to_the_full_matrix():
    g = np.random.default_rng(2)
    x = _maps(g, 12, 7, 3, 3, mean=0.0, std=1.0)
    y = _maps(g, 12, 5, 6, 6, mean=0.0, std=1.0)
    batches = np.array_split(np.arange(12), [5])
    full = pearson(_stream(x, y, batches)).numpy()
    assembled = np.zeros_like(full)
    for xs in unit_tiles(7, 3):
        for ys in unit_tiles(5, 2):
            stats = _stream(x, y, batches, x_units=xs, y_units=ys)
            assembled[xs[0] : xs[1], ys[0] : ys[1]] = pearson(stats).numpy()
    assert unit_tiles(7, 3) == [(0, 3), (3, 6), (6, 7)]
    np.testing.assert_allclose(assembled, full, atol=1e-13)
    np.testing.assert_allclose(full, naive_corr(x, y), atol=1e-10)


def test_constant_units_have_zero_correlation():
    g = np.random.default_rng(3)
    x = g.normal(size=(10, 3, 4, 4))
    x[:, 1] = 0.0  # a dead ReLU unit
    x[:, 2] = 7.25  # a constant unit
    y = g.normal(size=(10, 2, 4, 4))
    corr = pearson(_stream(x, y, [np.arange(4), np.arange(4, 10)])).numpy()
    np.testing.assert_array_equal(corr[1:], 0.0)
    np.testing.assert_allclose(corr[0], naive_corr(x[:, :1], y)[0], atol=1e-12)


def naive_best_buddies(corr: np.ndarray, k: int) -> list[tuple[int, int]]:
    def knn(row):
        return set(sorted(range(len(row)), key=lambda j: (-row[j], j))[:k])

    rows = [knn(corr[i]) for i in range(corr.shape[0])]
    cols = [knn(corr[:, j]) for j in range(corr.shape[1])]
    return [(i, j) for i in range(corr.shape[0]) for j in range(corr.shape[1]) if j in rows[i] and i in cols[j]]


def test_best_buddies_recover_a_planted_permutation():
    g = np.random.default_rng(4)
    u = 25
    x = g.normal(size=(20, u, 6, 6))
    perm = g.permutation(u)
    y = x[:, perm] + 0.3 * g.normal(size=(20, u, 6, 6))  # y unit j copies x unit perm[j]
    corr = pearson(_stream(x, y, [np.arange(20)]))
    pairs = best_buddies(corr, k=1)
    assert sorted(map(tuple, pairs.tolist())) == sorted((int(perm[j]), j) for j in range(u))
    loose = {tuple(p) for p in best_buddies(corr, k=3).tolist()}
    assert {(int(perm[j]), j) for j in range(u)} <= loose
    for k in (1, 2, 3):
        assert [tuple(p) for p in best_buddies(corr, k).tolist()] == naive_best_buddies(corr.numpy(), k)


def test_best_buddies_with_ties_match_the_naive_definition():
    g = np.random.default_rng(5)
    corr = torch.from_numpy(g.integers(-3, 4, size=(9, 11)).astype(np.float64) / 4)
    for k in (1, 2, 4):
        assert [tuple(p) for p in best_buddies(corr, k).tolist()] == naive_best_buddies(corr.numpy(), k)
    with pytest.raises(ConfigError, match="k must be"):
        best_buddies(corr, 0)


def test_merge_across_models_and_cluster_by_self_best_buddies():
    bb1 = torch.tensor([[0, 5], [1, 5], [2, 7], [3, 1]])
    bb2 = torch.tensor([[0, 2], [1, 3], [1, 4], [3, 0], [4, 4]])
    tuples = rosetta_units([bb1, bb2])
    assert tuples.tolist() == [[0, 5, 2], [1, 5, 3], [1, 5, 4], [3, 1, 0]]
    assert rosetta_units([bb1]).tolist() == bb1.tolist()  # m = 1: R(G, D) = BB(G, D)
    # Anchor units 0 and 1 are synonyms; 2–3 are, but 2 has no Rosetta tuple, so 3 stays alone.
    labels = cluster_units(tuples, torch.tensor([[0, 1], [2, 3]]))
    assert labels.tolist() == [0, 0, 0, 1]
    assert cluster_units(tuples, torch.empty(0, 2, dtype=torch.long)).tolist() == [0, 1, 1, 2]


def test_self_best_buddies_exclude_the_diagonal():
    g = np.random.default_rng(6)
    base = g.normal(size=(15, 4, 5, 5))
    x = np.concatenate([base, base[:, :2] + 0.2 * g.normal(size=(15, 2, 5, 5))], axis=1)  # 4 ≈ 0, 5 ≈ 1
    xt = torch.from_numpy(x)
    stats = pair_stats_update(init_pair_stats(xt, xt), xt, xt)
    corr = pearson(stats)
    pairs = self_best_buddies(corr, k=1)
    assert {(0, 4), (1, 5)} <= {tuple(p) for p in pairs.tolist()}
    assert all(i < j for i, j in pairs.tolist())
    # Through the cluster step the synonyms form one concept each.
    tuples = torch.tensor([[0, 9], [1, 8], [4, 7], [5, 6]])
    assert cluster_units(tuples, pairs).tolist() == [0, 1, 0, 1]


def test_validation_errors():
    x = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(ConfigError, match="x_units"):
        init_pair_stats(x, x, x_units=(2, 5))
    stats = init_pair_stats(x, x)
    with pytest.raises(ConfigError, match="same images"):
        pair_stats_update(stats, x, x[:1])
    with pytest.raises(ConfigError, match="cannot merge tiles"):
        merge_pair_stats(stats, init_pair_stats(x, x, y_units=(0, 2)))
    with pytest.raises(ConfigError, match="image, unit"):
        init_pair_stats(x[0], x)
