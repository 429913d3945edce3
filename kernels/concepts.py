"""Concept discovery and spurious-cue mining from neurons' sparse text decompositions (second-order
paper App. A.5 and §5.1, Eq. 6).

Both procedures weigh the texts of every neuron's OMP decomposition r_n ≈ Σ_j γ_j^n t_j (γ signed,
support in pick order, −1 padding) by a per-neuron weight a_n and add them up per text:

    w_j = Σ_n a_n γ_j^n        (`text_scores`; a sparse product, the dense [neuron, text] γ is never formed)

* concept discovery (A.5): a_n(I) = ν_n(I) · 1[ν_n(I) > τ_n] with ν_n(I) = ‖φ_n(I) − φ̄_n‖ and τ_n a
  per-neuron threshold (`concept_weights`), one weight row per image;
* cue mining (Eq. 6): a_n = ⟨v, r_n⟩ · 1[n ∈ 𝒩] with v = t̂(c_wrong) − t̂(c_true) and 𝒩 the neurons of
  largest |⟨v, r_n⟩| (`cue_weights`). The reference code ranks single (neuron, text) entries
  γ_j^n ⟨v, r_n⟩ instead of their sums (`entry_ranking`).

Ranks are by value, descending, ties to the lower index (a stable sort), so results do not depend on
how the rows were blocked.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from clipscope.errors import ConfigError


class Ranked(NamedTuple):
    """indices: the top entries' indices, values: their values (both [..., rank])."""

    indices: Int[Tensor, "*batch rank"]
    values: Float[Tensor, "*batch rank"]


def _check_decomposition(support: Tensor, coefs: Tensor, n_texts: int) -> None:
    if support.ndim != 2 or coefs.shape != support.shape:
        raise ConfigError(f"support and coefs must both be [neuron, pick], got {tuple(support.shape)} and "
                          f"{tuple(coefs.shape)}")
    if support.numel() and (int(support.max()) >= n_texts or int(support.min()) < -1):
        raise ConfigError(f"support holds text indices outside −1…{n_texts - 1}")


def text_scores(
    weights: Float[Tensor, "*batch neuron"],
    support: Int[Tensor, "neuron pick"],
    coefs: Float[Tensor, "neuron pick"],
    n_texts: int,
) -> Float[Tensor, "*batch text"]:
    """w_j = Σ_n weights_n · γ_j^n for every text j (γ from `support`/`coefs`; −1 picks are skipped)."""
    _check_decomposition(support, coefs, n_texts)
    if weights.shape[-1] != support.shape[0]:
        raise ConfigError(f"weights have {weights.shape[-1]} neurons, the decomposition {support.shape[0]}")
    batch = weights.shape[:-1]
    flat = weights.reshape(-1, weights.shape[-1])
    used = support >= 0
    index = torch.where(used, support, 0)  # [neuron pick]
    gamma = torch.where(used, coefs, 0).to(flat.dtype)
    # Only the non-zero weights contribute (a few % of the neurons of an image; |𝒩| neurons for Eq. 6), so the
    # temporaries are [non-zero, pick], not [batch, neuron, pick].
    row, neuron = torch.nonzero(flat, as_tuple=True)
    values = flat[row, neuron, None] * gamma[neuron]  # [non-zero pick]
    target = row[:, None] * n_texts + index[neuron]
    out = torch.zeros(flat.shape[0] * n_texts, dtype=flat.dtype, device=flat.device)
    out.index_add_(0, target.reshape(-1), values.reshape(-1))
    return out.reshape(*batch, n_texts)


def concept_weights(
    norms: Float[Tensor, "sample neuron"], thresholds: Float[Tensor, " neuron"]
) -> tuple[Float[Tensor, "sample neuron"], Bool[Tensor, "sample neuron"]]:
    """(a_n(I) = ν_n(I)·1[ν_n(I) > τ_n], the active set 1[ν_n(I) > τ_n]); a NaN threshold activates nothing."""
    if norms.ndim != 2 or thresholds.shape != norms.shape[1:]:
        raise ConfigError(f"thresholds must have shape [{norms.shape[-1]}] for norms {tuple(norms.shape)}, "
                          f"got {tuple(thresholds.shape)}")
    active = norms > thresholds.to(norms.dtype)
    return torch.where(active, norms, 0), active


def top_ranked(values: Float[Tensor, "*batch item"], k: int, *, allowed: Bool[Tensor, " item"] | None = None) -> Ranked:
    """The k largest values along the last axis (ties: lower index first); `allowed` masks items out."""
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be an integer ≥ 1, got {k!r}")
    if allowed is not None:
        if allowed.shape != values.shape[-1:]:
            raise ConfigError(f"allowed must have shape [{values.shape[-1]}], got {tuple(allowed.shape)}")
        values = torch.where(allowed, values, -torch.inf)
        k = min(k, int(allowed.sum()))
    order = torch.sort(values, dim=-1, descending=True, stable=True)
    k = min(k, values.shape[-1])
    return Ranked(order.indices[..., :k], order.values[..., :k])


def cue_direction(true_text: Float[Tensor, " embed"], wrong_text: Float[Tensor, " embed"]) -> Float[Tensor, " embed"]:
    """v = t̂(c_wrong) − t̂(c_true) from the two (any-norm) text embeddings."""
    if true_text.shape != wrong_text.shape or true_text.ndim != 1:
        raise ConfigError(f"the two text embeddings must be vectors of one size, got {tuple(true_text.shape)} "
                          f"and {tuple(wrong_text.shape)}")
    unit = torch.nn.functional.normalize(torch.stack([wrong_text, true_text]), dim=-1)
    return unit[0] - unit[1]


def cue_weights(
    pcs: Float[Tensor, "neuron embed"], direction: Float[Tensor, " embed"], n_neurons: int
) -> tuple[Float[Tensor, " neuron"], Int[Tensor, " chosen"]]:
    """(a_n = ⟨v, r_n⟩ on the `n_neurons` neurons of largest |⟨v, r_n⟩| and 0 elsewhere, those neurons
    in rank order)."""
    if pcs.ndim != 2 or direction.shape != pcs.shape[1:]:
        raise ConfigError(f"direction must have shape [{pcs.shape[-1]}] for PCs {tuple(pcs.shape)}, "
                          f"got {tuple(direction.shape)}")
    along = pcs @ direction.to(pcs.dtype)
    chosen = top_ranked(along.abs(), n_neurons).indices
    weights = torch.zeros_like(along)
    weights[chosen] = along[chosen]
    return weights, chosen


def entry_ranking(
    weights: Float[Tensor, " neuron"],
    support: Int[Tensor, "neuron pick"],
    coefs: Float[Tensor, "neuron pick"],
    n_entries: int,
    *,
    allowed: Bool[Tensor, " text"] | None = None,
) -> Ranked:
    """The reference code's ranking: every (neuron, text) entry weights_n·γ_j^n of the neurons with a
    non-zero weight is ranked on its own (ties: lower neuron, then earlier pick), the top `n_entries`
    entries are kept, then repeated texts are dropped (first occurrence kept). Texts outside `allowed`
    are left out before ranking."""
    n_texts = int(allowed.shape[0]) if allowed is not None else int(support.max()) + 1
    _check_decomposition(support, coefs, n_texts)
    keep = (support >= 0) & (weights != 0)[:, None]
    if allowed is not None:
        keep &= allowed[torch.where(support >= 0, support, 0)]
    values = (weights[:, None] * coefs.to(weights.dtype))[keep]  # row-major: neuron, then pick
    texts = support[keep]
    top = top_ranked(values, max(1, min(n_entries, values.numel()))) if values.numel() else None
    if top is None:
        return Ranked(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=weights.dtype))
    picked, seen, out_values = [], set(), []
    for index, value in zip(texts[top.indices].tolist(), top.values.tolist()):
        if index not in seen:
            seen.add(index)
            picked.append(index)
            out_values.append(value)
    return Ranked(torch.tensor(picked, dtype=torch.long), torch.tensor(out_values, dtype=weights.dtype))
