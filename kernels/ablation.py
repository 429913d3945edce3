"""Mean-ablation of additive components of an image embedding (thesis §2.3; scored by `zero_shot`).

Mean-ablating a set S of components replaces each c ∈ S by its dataset mean c̄, so the embedding
becomes emb − Σ_{c∈S}(c − c̄): only the stored components and their means are needed, never the
model. The components are the direct-effect terms of docs/methods.md (MLPs, heads, the class token
attended from itself), each already folded through ln_post with the image's own μ, σ.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from clipscope.errors import ConfigError


def ablation_delta(
    terms: Float[Tensor, "sample *component embed"], means: Float[Tensor, "*component embed"]
) -> Float[Tensor, "sample embed"]:
    """Σ_c (c − c̄) over every component axis: what mean-ablating all of `terms` removes."""
    if terms.shape[1:] != means.shape:
        raise ConfigError(f"component terms {tuple(terms.shape)} and their means {tuple(means.shape)} do not match")
    centred = terms - means
    return centred.flatten(1, -2).sum(1) if centred.ndim > 2 else centred


def mean_ablate(
    embedding: Float[Tensor, "sample embed"],
    terms: Float[Tensor, "sample *component embed"],
    means: Float[Tensor, "*component embed"],
) -> Float[Tensor, "sample embed"]:
    """The embedding with every component of `terms` replaced by its mean."""
    return embedding - ablation_delta(terms, means)


def masked_head_delta(
    centred_heads: Float[Tensor, "sample layer head embed"], mask: Bool[Tensor, "*ablation layer head"]
) -> Float[Tensor, "*ablation sample embed"]:
    """Σ over the masked (layer, head) of c − c̄, for one or a stack of head masks."""
    return torch.einsum("slhd,...lh->...sd", centred_heads, mask.to(centred_heads.dtype))
