"""A neutral description of a CLIP ViT image tower, and the adapter from open_clip.

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
from torch import Tensor, nn

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


def _ln(module: nn.Module, where: str) -> LayerNormParams:
    if not isinstance(module, nn.LayerNorm) or not module.elementwise_affine:
        raise ModelError(f"unsupported model: {where} is {type(module).__name__}, expected an affine LayerNorm")
    bias = module.bias if module.bias is not None else torch.zeros_like(module.weight)
    return LayerNormParams(module.weight.detach(), bias.detach(), float(module.eps))


def _layer_scale(module: nn.Module, width: int, like: Tensor) -> Tensor:
    if isinstance(module, nn.Identity):
        return torch.ones(width, dtype=like.dtype, device=like.device)
    gamma = getattr(module, "gamma", None)
    if not isinstance(gamma, Tensor):
        raise ModelError(f"unsupported model: LayerScale module {type(module).__name__} has no gamma")
    return gamma.detach()


def _activation(module: nn.Module, where: str) -> str:
    name = type(module).__name__
    if name == "QuickGELU":
        return "quick_gelu"
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    raise ModelError(f"unsupported model: {where} activation is {name}; supported: GELU, QuickGELU")


def _block(block: nn.Module, index: int) -> BlockParams:
    where = f"visual.transformer.resblocks[{index}]"
    attn = getattr(block, "attn", None)
    if type(block).__name__ != "ResidualAttentionBlock" or not isinstance(attn, nn.MultiheadAttention):
        raise ModelError(
            f"unsupported model: {where} is {type(block).__name__} (custom attention blocks such as "
            "qk-norm or scaled-cosine attention are not decomposed)"
        )
    if hasattr(block, "ln_1_kv") or not attn._qkv_same_embed_dim or attn.in_proj_bias is None:
        raise ModelError(f"unsupported model: {where} uses cross-attention or bias-free attention")
    width, heads = attn.embed_dim, attn.num_heads
    e = width // heads
    w_q, w_k, w_v = attn.in_proj_weight.detach().reshape(3, heads, e, width)
    b_q, b_k, b_v = attn.in_proj_bias.detach().reshape(3, heads, e)
    # Views, never copies: a spec cached on a LoadedModel must follow in-place training and edits.
    w_o = attn.out_proj.weight.detach().reshape(width, heads, e).permute(1, 0, 2)
    b_o = attn.out_proj.bias.detach() if attn.out_proj.bias is not None else torch.zeros(width)
    mlp = block.mlp
    c_fc, act, c_proj = getattr(mlp, "c_fc", None), getattr(mlp, "gelu", None), getattr(mlp, "c_proj", None)
    if not isinstance(c_fc, nn.Linear) or not isinstance(c_proj, nn.Linear) or act is None or len(mlp) != 3:
        raise ModelError(f"unsupported model: {where}.mlp is not Linear → activation → Linear")
    like = attn.in_proj_weight
    return BlockParams(
        ln_1=_ln(block.ln_1, f"{where}.ln_1"),
        w_q=w_q, w_k=w_k, w_v=w_v, b_q=b_q, b_k=b_k, b_v=b_v,
        w_o=w_o, b_o=b_o,
        ls_1=_layer_scale(block.ls_1, width, like),
        ln_2=_ln(block.ln_2, f"{where}.ln_2"),
        w_in=c_fc.weight.detach(), b_in=c_fc.bias.detach(),
        w_out=c_proj.weight.detach(), b_out=c_proj.bias.detach(),
        ls_2=_layer_scale(block.ls_2, width, like),
        activation=_activation(act, f"{where}.mlp"),
    )


def vit_spec_from_open_clip(visual: nn.Module) -> ViTSpec:
    """Describe an open_clip ``VisionTransformer``; refuse variants that would be mis-decomposed."""
    name = type(visual).__name__
    if name != "VisionTransformer":
        raise ModelError(f"unsupported model: image tower is {name}; clipscope decomposes open_clip ViTs only")
    if getattr(visual, "attn_pool", None) is not None:
        raise ModelError("unsupported model: attention pooling (attn_pool) is not decomposed")
    if getattr(visual, "pool_type", "tok") != "tok":
        raise ModelError(f"unsupported model: pool_type={visual.pool_type!r}; only class-token pooling is decomposed")
    if type(visual.patch_dropout).__name__ != "Identity" and visual.training:
        raise ModelError("unsupported model: active patch dropout (put the model in eval mode)")
    conv = visual.conv1
    blocks = tuple(_block(b, i) for i, b in enumerate(visual.transformer.resblocks))
    width = conv.out_channels
    proj = visual.proj.detach() if visual.proj is not None else torch.eye(width, dtype=conv.weight.dtype)
    image_size = tuple(visual.image_size) if isinstance(visual.image_size, (tuple, list)) else (visual.image_size,) * 2
    return ViTSpec(
        image_size=(int(image_size[0]), int(image_size[1])),
        patch_size=(int(conv.kernel_size[0]), int(conv.kernel_size[1])),
        patch_weight=conv.weight.detach(),
        patch_bias=conv.bias.detach() if conv.bias is not None else None,
        class_embedding=visual.class_embedding.detach(),
        positional_embedding=visual.positional_embedding.detach(),
        ln_pre=None if isinstance(visual.ln_pre, nn.Identity) else _ln(visual.ln_pre, "visual.ln_pre"),
        blocks=blocks,
        ln_post=_ln(visual.ln_post, "visual.ln_post"),
        proj=proj,
    )
