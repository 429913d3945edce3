"""kernels.concepts: text scores from sparse decompositions (= dense γ products), thresholds, stable ranks,
Eq. 6 and the reference code's per-entry ranking (= literal loops on synthetic PCs and γ)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipscope.errors import ConfigError
from clipscope.kernels.concepts import (
    concept_weights,
    cue_direction,
    cue_weights,
    entry_ranking,
    text_scores,
    top_ranked,
)


def random_decomposition(rng, n_neurons=7, picks=4, n_texts=11):
    support = np.full((n_neurons, picks), -1, np.int64)
    coefs = np.zeros((n_neurons, picks))
    for n in range(n_neurons):
        k = int(rng.integers(0, picks + 1))  # some stop early (−1 padding), one may be empty
        support[n, :k] = rng.choice(n_texts, size=k, replace=False)
        coefs[n, :k] = rng.normal(size=k)
    return support, coefs, n_texts


def dense(support, coefs, n_texts):
    gamma = np.zeros((support.shape[0], n_texts))
    for n in range(support.shape[0]):
        for p in range(support.shape[1]):
            if support[n, p] >= 0:
                gamma[n, support[n, p]] += coefs[n, p]
    return gamma


def test_text_scores_equal_dense_product():
    rng = np.random.default_rng(0)
    support, coefs, n_texts = random_decomposition(rng)
    weights = rng.normal(size=(3, 5, support.shape[0]))
    got = text_scores(torch.from_numpy(weights), torch.from_numpy(support), torch.from_numpy(coefs), n_texts)
    np.testing.assert_allclose(got.numpy(), weights @ dense(support, coefs, n_texts), rtol=1e-12, atol=1e-14)
    with pytest.raises(ConfigError, match="support holds text indices outside"):
        text_scores(torch.from_numpy(weights), torch.from_numpy(support), torch.from_numpy(coefs), 2)


def test_concept_weights_threshold_is_strict():
    norms = torch.tensor([[1.0, 2.0, 3.0], [0.5, 2.5, float("nan")]])
    tau = torch.tensor([1.0, 2.0, float("nan")])
    weights, active = concept_weights(norms, tau)
    assert active.tolist() == [[False, False, False], [False, True, False]]
    assert weights.tolist() == [[0.0, 0.0, 0.0], [0.0, 2.5, 0.0]]


def test_top_ranked_ties_go_to_the_lower_index():
    values = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    ranked = top_ranked(values, 3)
    assert ranked.indices.tolist() == [[1, 2, 4], [0, 1, 2]]
    allowed = torch.tensor([True, False, True, True, True])
    assert top_ranked(values[0], 10, allowed=allowed).indices.tolist() == [2, 4, 3, 0]


def test_eq6_and_reference_ranking_equal_literal_loops():
    rng = np.random.default_rng(1)
    support, coefs, n_texts = random_decomposition(rng, n_neurons=9, picks=3, n_texts=8)
    pcs = rng.normal(size=(9, 6))
    t_true, t_wrong = rng.normal(size=6), rng.normal(size=6)
    v = cue_direction(torch.from_numpy(t_true), torch.from_numpy(t_wrong)).numpy()
    np.testing.assert_allclose(v, t_wrong / np.linalg.norm(t_wrong) - t_true / np.linalg.norm(t_true))
    k = 4
    weights, chosen = cue_weights(torch.from_numpy(pcs), torch.from_numpy(v), k)
    along = pcs @ v
    expected_chosen = sorted(range(9), key=lambda n: (-abs(along[n]), n))[:k]
    assert chosen.tolist() == expected_chosen
    # Eq. 6: w_j = Σ_{n∈𝒩} γ_j^n ⟨v, r_n⟩
    gamma = dense(support, coefs, n_texts)
    w = sum(gamma[n] * along[n] for n in expected_chosen)
    got = text_scores(weights, torch.from_numpy(support), torch.from_numpy(coefs), n_texts)
    np.testing.assert_allclose(got.numpy(), w, rtol=1e-12, atol=1e-14)
    # the reference: every (neuron, text) entry ranked alone, top entries, then de-duplicated
    allowed = np.ones(n_texts, bool)
    allowed[2] = False
    entries = [(coefs[n, p] * along[n], n, p, support[n, p]) for n in expected_chosen for p in range(3)
               if support[n, p] >= 0 and allowed[support[n, p]]]
    entries.sort(key=lambda e: (-e[0], e[1], e[2]))
    picked, values = [], []
    for value, _, _, text in entries[:5]:
        if text not in picked:
            picked.append(int(text))
            values.append(value)
    ranked = entry_ranking(weights, torch.from_numpy(support), torch.from_numpy(coefs), 5,
                           allowed=torch.from_numpy(allowed))
    assert ranked.indices.tolist() == picked
    np.testing.assert_allclose(ranked.values.numpy(), values, rtol=1e-12)
