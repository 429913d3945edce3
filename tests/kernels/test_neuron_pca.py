"""Rank-1 PCA of second-order effects in q-space against materialised φ and numpy's SVD."""

import numpy as np
import pytest
import torch

from clipscope.errors import ConfigError, DataError
from clipscope.kernels.neuron_pca import (
    gram_norms,
    neuron_factors,
    pc_coordinates,
    rank1_pc,
    topk_init,
    topk_merge,
    topk_update,
)


def _world(seed: int, b=600, n=12, p=6, e=20):
    g = np.random.default_rng(seed)
    # Sparse, heavy-tailed q (a few images dominate each neuron), like real second-order weights.
    q = g.normal(size=(b, n, p)) * (g.random(size=(b, n, 1)) < 0.1) * 5 + 0.3 * g.normal(size=(b, n, p)) + 0.2
    d = g.normal(size=(n, p, e))
    shared = g.normal(size=(b, e)) + 1.0
    return q, d, shared


def _phi(q, d, shared=None, scale=1.0):
    phi = np.einsum("bnp,npe->bne", q, d)
    if shared is not None:
        phi = phi + scale * shared[:, None, :]
    return phi


def reference_sign(v: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """compute_pcas.py's rule (#positive > k//2 keeps vh[0]), with the tie rule where it is undetermined."""
    proj = rows @ v
    k = len(rows)
    if (proj > 0).sum() > k // 2:
        return v
    if (proj < 0).sum() > k // 2:
        return -v
    if proj.sum() != 0:
        return v * np.sign(proj.sum())
    return v * np.sign(v[np.argmax(np.abs(v))])


def reference_pcs(phi: np.ndarray, k: int):
    """compute_pcas.py on materialised effects [image, neuron, embed]."""
    centred = phi - phi.mean(axis=0)
    pcs, tops = [], []
    for n in range(phi.shape[1]):
        norms = np.linalg.norm(centred[:, n], axis=-1)
        top = np.argsort(norms)[-k:]
        rows = centred[top, n]
        _, _, vh = np.linalg.svd(rows, full_matrices=False)
        pcs.append(reference_sign(vh[0], rows))
        tops.append(set(top.tolist()))
    return np.stack(pcs), tops


@pytest.mark.parametrize("with_shared", [False, True])
@pytest.mark.parametrize("centred", [False, True])
def test_gram_norms_match_materialised_effects(with_shared, centred):
    q, d, shared = _world(0)
    scale = 1 / 7
    phi = _phi(q, d, shared if with_shared else None, scale)
    kwargs = {}
    if centred:
        phi = phi - phi.mean(axis=0)
        kwargs["q_mean"] = torch.from_numpy(q.mean(axis=0))
        if with_shared:
            kwargs["shared_mean"] = torch.from_numpy(shared.mean(axis=0))
    if with_shared:
        kwargs.update(shared=torch.from_numpy(shared), shared_scale=scale)
    got = gram_norms(torch.from_numpy(q), torch.from_numpy(d), **kwargs)
    np.testing.assert_allclose(got.numpy(), (phi**2).sum(axis=-1), rtol=1e-10)
    factors = neuron_factors(torch.from_numpy(d))
    again = gram_norms(torch.from_numpy(q), factors=factors, **kwargs)
    torch.testing.assert_close(again, got, rtol=1e-13, atol=0)


@pytest.mark.parametrize(
    "case",
    [
        dict(seed=1, with_shared=False, p=6, e=20),
        dict(seed=2, with_shared=True, p=6, e=20),
        dict(seed=3, with_shared=False, p=24, e=16),  # more weights than embed dims
        dict(seed=4, with_shared=True, p=24, e=16),
    ],
)
def test_streamed_pipeline_matches_reference_pca(case):
    q, d, shared = _world(case["seed"], p=case["p"], e=case["e"])
    scale = 0.25 if case["with_shared"] else 1.0
    k = 20
    phi = _phi(q, d, shared if case["with_shared"] else None, scale)
    ref_pcs, ref_tops = reference_pcs(phi, k)

    qt, dt, st = torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(shared)
    g = np.random.default_rng(case["seed"])
    cuts = np.sort(g.choice(np.arange(1, len(q)), size=6, replace=False))
    blocks = [torch.from_numpy(b) for b in np.split(np.arange(len(q)), cuts)]
    # Pass 1: means from float64 block sums added in a random order (as the means job streams them).
    order = g.permutation(len(blocks))
    q_mean = sum(qt[blocks[i]].double().sum(0) for i in order) / len(q)
    s_mean = sum(st[blocks[i]].double().sum(0) for i in order) / len(q)
    shared_kw = dict(shared_mean=s_mean, shared_scale=scale) if case["with_shared"] else {}
    # Pass 2: centred norms → streaming top-k per neuron, blocks in another order.
    factors = neuron_factors(dt)
    state = topk_init(q.shape[1], k)
    for i in g.permutation(len(blocks)):
        rows = blocks[i]
        extra = dict(shared=st[rows], **shared_kw) if case["with_shared"] else {}
        scores = gram_norms(qt[rows], factors=factors, q_mean=q_mean, **extra)
        state = topk_update(state, scores, rows)
    assert [set(r.tolist()) for r in state.rows] == ref_tops
    # Gather the top rows and solve in q-space.
    neurons = torch.arange(q.shape[1])[:, None]
    q_top = qt[state.rows, neurons]  # [N, k, P]
    extra = dict(shared_top=st[state.rows], **shared_kw) if case["with_shared"] else {}
    res = rank1_pc(q_top, factors=factors, q_mean=q_mean, **extra)
    np.testing.assert_allclose(res.pc.numpy(), ref_pcs, rtol=1e-8, atol=1e-10)
    # Singular value, energy ratio and projections against the materialised rows.
    centred = phi - phi.mean(axis=0)
    for n in range(q.shape[1]):
        rows = centred[state.rows[n].numpy(), n]
        s = np.linalg.svd(rows, compute_uv=False)
        np.testing.assert_allclose(res.singular_value[n].item(), s[0], rtol=1e-10)
        np.testing.assert_allclose(res.explained_ratio[n].item(), s[0] ** 2 / (s**2).sum(), rtol=1e-10)
        np.testing.assert_allclose(res.projections[n].numpy(), rows @ ref_pcs[n], rtol=1e-8, atol=1e-9)
    # Coefficients of the rank-1 approximation for every image.
    coords = pc_coordinates(
        qt, res.pc, dt, q_mean=q_mean, **(dict(shared=st, **shared_kw) if case["with_shared"] else {})
    )
    np.testing.assert_allclose(coords.numpy(), np.einsum("bne,ne->bn", centred, ref_pcs), rtol=1e-9, atol=1e-9)


def test_sign_rule_majority_then_sum_on_a_tie():
    e = 8
    r = np.zeros(e)
    r[0] = 1.0
    d = np.eye(e)[None]  # one neuron, q-space = embed space
    # Majority positive although the sum is negative: keep the majority.
    u = np.array([1.0, 1.0, 1.0, -9.0])
    noise = np.zeros((4, e))
    noise[:, 1] = [0.01, -0.01, 0.01, -0.01]
    rows = np.outer(u, r) + noise
    res = rank1_pc(torch.from_numpy(rows[None]), torch.from_numpy(d))
    assert res.pc[0, 0] > 0 and (res.projections[0] > 0).sum() == 3
    # Two positive, two negative: the sign with the positive sum wins.
    u = np.array([3.0, 1.0, -1.0, -1.0])
    rows = np.outer(u, r) + noise
    for s in (1.0, -1.0):
        res = rank1_pc(torch.from_numpy(s * rows[None]), torch.from_numpy(d))
        assert res.projections[0].sum() > 0
        np.testing.assert_allclose(res.pc[0].numpy(), s * reference_sign(np.linalg.svd(rows)[2][0], rows), atol=1e-12)


def test_topk_is_order_independent_with_ties_broken_by_row():
    g = np.random.default_rng(5)
    n, total, k = 7, 300, 15
    scores = torch.from_numpy(g.integers(0, 6, size=(total, n)).astype(np.float64))  # many ties
    rows = torch.from_numpy(g.permutation(10_000)[:total])
    cuts = np.sort(g.choice(np.arange(1, total), size=9, replace=False))
    parts = np.split(np.arange(total), cuts)
    expected_rows, expected_values = [], []
    for j in range(n):
        order = sorted(range(total), key=lambda i: (-scores[i, j].item(), rows[i].item()))[:k]
        expected_rows.append([rows[i].item() for i in order])
        expected_values.append([scores[i, j].item() for i in order])
    results = []
    for trial in range(3):
        perm = g.permutation(len(parts))
        states = [topk_update(topk_init(n, k), scores[parts[i]], rows[parts[i]]) for i in perm]
        if trial == 0:  # sequential updates
            state = topk_init(n, k)
            for i in perm:
                state = topk_update(state, scores[parts[i]], rows[parts[i]])
        else:  # a tree of merges
            while len(states) > 1:
                states = [
                    topk_merge(*states[i : i + 2]) if i + 1 < len(states) else states[i]
                    for i in range(0, len(states), 2)
                ]
            state = states[0]
        results.append(state)
        assert state.rows.tolist() == expected_rows
        assert state.values.tolist() == expected_values
    assert all(torch.equal(r.rows, results[0].rows) for r in results)


def test_topk_with_fewer_rows_than_k_and_errors():
    state = topk_update(topk_init(2, 5), torch.tensor([[1.0, 2.0], [3.0, 0.5]]), torch.tensor([10, 11]))
    assert state.rows.tolist() == [[11, 10], [10, 11]]
    with pytest.raises(DataError, match="NaN"):
        topk_update(state, torch.tensor([[float("nan"), 1.0]]), torch.tensor([12]))
    with pytest.raises(ConfigError, match="k must be"):
        topk_init(3, 0)
    with pytest.raises(ConfigError, match="scores must have shape"):
        topk_update(state, torch.ones(2, 3), torch.tensor([1, 2]))
    with pytest.raises(ConfigError, match="q must have shape"):
        gram_norms(torch.ones(4, 2, 3, dtype=torch.float64), torch.ones(2, 4, 5, dtype=torch.float64))
