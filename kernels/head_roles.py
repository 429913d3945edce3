"""Head labels from tagged TextSpan texts, and CLIP-InterpreT's entanglement and association scores.

Inputs per head (heads of all chosen layers flattened, |H| of them): the property index of each of its
TextSpan picks in pick order (−1: the text names no property) and each pick's explained ratio.

* label(h) = the property with the most of the head's first m picks; ties → the larger summed explained
  ratio of those picks → the lower property index; a head with no tagged text among them: −1 ("none");
* matches(h) = how many of the first m picks carry label(h) (0 for "none");
* association A = #{h : matches(h) ≥ min_match} / |H|  (paper §4.2: "at least three text descriptions");
* entanglement E = 1 − #(distinct labels among labelled heads) / |H|  (0 when every head has its own
  property), and E_shared = #{labelled h : another head has label(h)} / |H|.
Both scores count heads over |H|, which is why every published value is a multiple of 1/48 (ViT-B: 4
layers × 12 heads) or 1/64 (ViT-L).
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int64
from torch import Tensor


def property_shares(tags: Int64[Tensor, "head pick"], ratios: Float[Tensor, "head pick"],
                    n_properties: int) -> Float[Tensor, "head property"]:
    """Per head and property: the summed explained ratio of the head's picks tagged with it (all picks)."""
    shares = torch.zeros(tags.shape[0], n_properties, dtype=torch.float64)
    tagged = tags >= 0
    rows = torch.arange(tags.shape[0])[:, None].expand_as(tags)
    shares.index_put_((rows[tagged], tags[tagged]), ratios.double()[tagged], accumulate=True)
    return shares


def label_heads(tags: Int64[Tensor, "head pick"], ratios: Float[Tensor, "head pick"], m: int,
                n_properties: int) -> tuple[Int64[Tensor, " head"], Int64[Tensor, " head"]]:
    """(label, matches) per head from its first m picks (see the module docstring)."""
    top, top_ratios = tags[:, :m], ratios[:, :m].double()
    counts = torch.zeros(tags.shape[0], n_properties, dtype=torch.int64)
    weight = torch.zeros(tags.shape[0], n_properties, dtype=torch.float64)
    for p in range(n_properties):
        hit = top == p
        counts[:, p] = hit.sum(1)
        weight[:, p] = (top_ratios * hit).sum(1)
    labels = torch.full((tags.shape[0],), -1, dtype=torch.int64)
    matches = torch.zeros(tags.shape[0], dtype=torch.int64)
    for h in range(tags.shape[0]):
        if counts[h].max() == 0:
            continue
        best = max(range(n_properties), key=lambda p: (int(counts[h, p]), float(weight[h, p]), -p))
        labels[h], matches[h] = best, counts[h, best]
    return labels, matches


def role_scores(labels: Int64[Tensor, " head"], matches: Int64[Tensor, " head"], min_match: int
                ) -> tuple[float, float, float]:
    """(entanglement, entanglement_shared, association) over the |H| heads given."""
    n = labels.numel()
    labelled = labels[labels >= 0]
    distinct, counts = torch.unique(labelled, return_counts=True)
    entanglement = 1.0 - distinct.numel() / n
    shared = int(counts[counts > 1].sum()) if counts.numel() else 0
    association = int((matches >= min_match).sum()) / n
    return entanglement, shared / n, association
