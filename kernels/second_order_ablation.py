"""Mean-ablation of neurons' second-order effects (second-order paper §3.3, Fig. 3), from q.

With φ_n(I) − φ̄_n = D_nᵀ(q_n(I) − q̄_n) + (s(I) − s̄) (s: the `split` convention's per-neuron
share of the neuron-independent terms, absent under `center`), replacing effects by their dataset
mean changes the image embedding by sums over neurons that are single contractions of q, so φ is
never materialised:

* all neurons:      emb − Σ_n (φ_n − φ̄_n)
* w/o small norm:   emb − Σ_n [I ∉ top_n] (φ_n − φ̄_n)   (ablated except on the neuron's top images)
* w/o large norm:   emb − Σ_n [I ∈ top_n] (φ_n − φ̄_n)
* PC1 reconstruction: emb − Σ_n (φ_n − φ̄_n) + Σ_n x_n r_n,  x_n = ⟨φ_n − φ̄_n, r_n⟩, i.e. every
  effect replaced by x_n r_n + φ̄_n (the paper's rank-1 approximation).

The terms are additive over neurons, so callers may sum `ablation_terms` over neuron chunks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from clipscope.errors import ConfigError

ABLATIONS = ("baseline", "all_neurons", "small_norm", "large_norm", "pc1_reconstruction")


class AblationTerms(NamedTuple):
    """Sums over neurons: every centred effect, those outside each neuron's top images, and the PC1 parts."""

    every: Float[Tensor, "sample embed"]
    outside_top: Float[Tensor, "sample embed"]
    pc1: Float[Tensor, "sample embed"]


def ablation_terms(
    dq: Float[Tensor, "sample neuron weight"],
    directions: Float[Tensor, "neuron weight embed"],
    pc: Float[Tensor, "neuron embed"],
    in_top: Bool[Tensor, "sample neuron"],
    ds: Float[Tensor, "sample embed"] | None = None,
) -> AblationTerms:
    """The three neuron sums of the module docstring for centred q (`dq` = q − q̄, `ds` = s − s̄)."""
    b, n, p = dq.shape
    if directions.shape[:2] != (n, p):
        raise ConfigError(f"directions must have shape [{n}, {p}, embed], got {tuple(directions.shape)}")
    e = directions.shape[2]
    if pc.shape != (n, e) or in_top.shape != (b, n):
        raise ConfigError(f"pc must have shape [{n}, {e}] and in_top [{b}, {n}], got {tuple(pc.shape)} and "
                          f"{tuple(in_top.shape)}")
    outside = (~in_top).to(dq.dtype)
    every = torch.einsum("bnp,npe->be", dq, directions)
    outside_top = torch.einsum("bnp,npe->be", dq * outside[:, :, None], directions)
    x = torch.einsum("bnp,np->bn", dq, torch.einsum("npe,ne->np", directions, pc))
    if ds is not None:
        if ds.shape != (b, e):
            raise ConfigError(f"ds must have shape [{b}, {e}], got {tuple(ds.shape)}")
        every = every + n * ds
        outside_top = outside_top + outside.sum(1, keepdim=True) * ds
        x = x + ds @ pc.T
    return AblationTerms(every, outside_top, x @ pc)


def add_terms(a: AblationTerms, b: AblationTerms) -> AblationTerms:
    return AblationTerms(*(x + y for x, y in zip(a, b)))


def ablated_embeddings(
    embedding: Float[Tensor, "sample embed"], terms: AblationTerms
) -> Float[Tensor, "ablation sample embed"]:
    """The image embeddings under each of `ABLATIONS`, in that order."""
    ablated_all = embedding - terms.every
    return torch.stack([
        embedding,
        ablated_all,
        embedding - terms.outside_top,
        embedding - (terms.every - terms.outside_top),
        ablated_all + terms.pc1,
    ])
