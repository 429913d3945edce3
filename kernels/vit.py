"""A neutral description of a CLIP ViT image tower (filled by `clipscope.pipelines.models.open_clip_adapter`).

Kernels work on `ViTSpec`, never on an ``nn.Module``: per-head attention weights are split out,
LayerScale is explicit (ones when absent), and the activation is named. An adapter for another
family (HF CLIP, SigLIP) only has to fill the same fields.

Conventions (per layer, per head h, head width e = width / heads):
  q_h = W_q[h] y + b_q[h]           W_q: [head, e, width]
  out = Σ_h W_o[h] z_h + b_o        W_o: [head, width, e]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from clipscope.errors import ModelError

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


@dataclass(frozen=True)
class LayerNormParams:
    weight: Float[Tensor, "width"]
    bias: Float[Tensor, "width"]
    eps: float


@dataclass(frozen=True)
class BlockParams:
    ln_1: LayerNormParams
    w_q: Float[Tensor, "head e width"]
    w_k: Float[Tensor, "head e width"]
    w_v: Float[Tensor, "head e width"]
    b_q: Float[Tensor, "head e"]
    b_k: Float[Tensor, "head e"]
    b_v: Float[Tensor, "head e"]
    w_o: Float[Tensor, "head width e"]
    b_o: Float[Tensor, "width"]
    ls_1: Float[Tensor, "width"]
    ln_2: LayerNormParams
    w_in: Float[Tensor, "neuron width"]
    b_in: Float[Tensor, "neuron"]
    w_out: Float[Tensor, "width neuron"]
    b_out: Float[Tensor, "width"]
    ls_2: Float[Tensor, "width"]
    activation: str


@dataclass(frozen=True)
class ViTSpec:
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    patch_weight: Float[Tensor, "width 3 ph pw"]
    patch_bias: Float[Tensor, "width"] | None
    class_embedding: Float[Tensor, "width"]
    positional_embedding: Float[Tensor, "token width"]
    ln_pre: LayerNormParams | None
    blocks: tuple[BlockParams, ...]
    ln_post: LayerNormParams
    proj: Float[Tensor, "width embed"]

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def n_heads(self) -> int:
        return self.blocks[0].w_q.shape[0]

    @property
    def width(self) -> int:
        return self.class_embedding.shape[0]

    @property
    def embed_dim(self) -> int:
        return self.proj.shape[1]

    @property
    def mlp_width(self) -> int:
        return self.blocks[0].w_in.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.positional_embedding.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.proj.dtype

    @property
    def device(self) -> torch.device:
        return self.proj.device

    def to(self, device=None, dtype=None) -> "ViTSpec":
        """A copy with every tensor moved/cast (as ``Tensor.to``)."""

        def move(value):
            if isinstance(value, Tensor):
                return value.to(device=device, dtype=dtype)
            if isinstance(value, (LayerNormParams, BlockParams)):
                return type(value)(**{k: move(v) for k, v in vars(value).items()})
            if isinstance(value, tuple) and value and isinstance(value[0], BlockParams):
                return tuple(move(v) for v in value)
            return value

        return ViTSpec(**{k: move(v) for k, v in vars(self).items()})


def check_layers(spec: ViTSpec, layers, what: str) -> tuple[int, ...]:
    """Validate 0-based resblock indices; returns them sorted and de-duplicated."""
    out = []
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < spec.n_layers:
            raise ModelError(
                f"{what}: layer {layer!r} is out of range; this model has layers 0..{spec.n_layers - 1}"
            )
        out.append(layer)
    return tuple(sorted(set(out)))

