"""The adapter from an open_clip ``VisionTransformer`` to the neutral `ViTSpec` the kernels work on.

Per-head attention weights are split out of ``nn.MultiheadAttention``'s fused projections, LayerScale
is made explicit (ones when absent) and the activation named. Variants the decomposition would get
wrong (attention pooling, custom attention blocks, active patch dropout) are refused by name. An
adapter for another family (HF CLIP, SigLIP) fills the same fields.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from clipscope.errors import ModelError
from clipscope.kernels.vit import BlockParams, LayerNormParams, ViTSpec


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
