"""One forward pass of a CLIP ViT that also returns its exact additive decomposition (docs/methods.md).

Everything is computed from the weights in a `ViTSpec`; attention is evaluated in full only
where the residual stream needs it, and per head only along the class-token query row, so memory
stays O(token · head · embed) per layer.

ln_post folding. With μ, σ of the final class token frozen, ln_post followed by the projection is
affine, so a component c of x^L_0 maps to f(c) = (c @ P̃)/σ + s·o, where
  split:  P̃ = diag(γ) P,                 o = Pᵀβ − (μ/σ)·Pᵀγ, with shares s summing to 1
  center: P̃ = (I − 11ᵀ/d) diag(γ) P,    o = 0, and Pᵀβ is a term of its own (in `direct/bias`).
`split` is the reference code's convention term for term (docs/methods.md): K₁ = 2L + 1 groups (the
embedding, L MLPs, L attention layers); the embedding and each MLP carry s = 1/K₁; each (token t,
head h) term of layer l is c_{t,l,h} + ls₁ˡ⊙b_Oˡ/(H·T) — the out-projection bias spread over the
layer's H·T terms, so it lives inside the heads — with s = 1/(K₁·H·T). A head (summed over its
tokens) therefore carries ls₁ˡ⊙b_Oˡ/H and s = 1/(K₁·H), and `direct/bias` is zero under `split`
(ViTSpec has no projection bias). Under `center` the out-projection biases stay in `direct/bias`.
Per-token terms sum to the per-head terms in both conventions.

The class token attended from itself (thesis Appendix A, "Mean-Ablation of the Class-Token Attended
from Itself") is the token-0 term summed over a layer's heads, Σ_h f(c_{0,l,h}) with each (token,
head) term's shares included; it is returned for every layer whenever direct effects are, at the cost
of one [head e] × [head e embed] product per layer, so it needs no per-token storage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from clipscope.errors import ConfigError, ModelError
from clipscope.kernels.vit import BlockParams, LayerNormParams, ViTSpec, check_layers

CONVENTIONS = ("split", "center")


@dataclass(frozen=True)
class DirectEffects:
    """The direct effects of every component on the image embedding (docs/methods.md), folded through ln_post.

    embedding + Σ mlps + Σ heads + bias = the image embedding; cls_token[:, l] is the class token
    attended from itself in layer l (token 0 of the per-token terms, summed over heads), part of heads.
    """

    embedding: Float[Tensor, "sample embed"]
    mlps: Float[Tensor, "sample layer embed"]
    heads: Float[Tensor, "sample layer head embed"]
    bias: Float[Tensor, "sample embed"]
    cls_token: Float[Tensor, "sample layer embed"]


@dataclass(frozen=True)
class SecondOrderTerms:
    """Second-order terms of one source layer's neurons: q (1/σ_post included) and, under `split`,
    the neuron-independent shared term."""

    weights: Float[Tensor, "sample later_layer head neuron"]
    shared: Float[Tensor, "sample embed"] | None


@dataclass(frozen=True)
class Decomposition:
    """What one `decompose` forward returns; the fields a request did not ask for are None / empty."""

    image_embedding: Float[Tensor, "sample embed"]
    direct: DirectEffects | None = None
    tokens: Float[Tensor, "sample token_layer head token embed"] | None = None
    second_order: dict[int, SecondOrderTerms] = field(default_factory=dict)
    activations: dict[int, Float[Tensor, "sample token neuron"]] = field(default_factory=dict)
    # Σ_{l,h} of the per-token terms over every layer (request.token_sum) and the class-token query
    # row of the attention of chosen layers (request.attention_layers).
    token_sum: Float[Tensor, "sample token embed"] | None = None
    attention: dict[int, Float[Tensor, "sample head token"]] = field(default_factory=dict)


@dataclass(frozen=True)
class DecomposeRequest:
    """What one forward should return besides the image embedding (layers are 0-based)."""

    direct: bool = True
    token_layers: tuple[int, ...] = ()
    second_order_layers: tuple[int, ...] = ()
    activation_layers: tuple[int, ...] = ()
    convention: str = "split"
    token_sum: bool = False
    attention_layers: tuple[int, ...] = ()

    def validated(self, spec: ViTSpec) -> "DecomposeRequest":
        if self.convention not in CONVENTIONS:
            raise ConfigError(f"ln convention must be one of {', '.join(CONVENTIONS)}, got {self.convention!r}")
        second = check_layers(spec, self.second_order_layers, "second-order layers")
        if second and second[-1] == spec.n_layers - 1:
            raise ConfigError(
                f"second-order layers: layer {second[-1]} is the last layer and has no later attention layer"
            )
        return DecomposeRequest(
            direct=self.direct,
            token_layers=check_layers(spec, self.token_layers, "token layers"),
            second_order_layers=second,
            activation_layers=check_layers(spec, self.activation_layers, "activation layers"),
            convention=self.convention,
            token_sum=bool(self.token_sum),
            attention_layers=check_layers(spec, self.attention_layers, "attention layers"),
        )


def activation(name: str, x: Tensor) -> Tensor:
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    raise ModelError(f"unknown activation {name!r}")


def layer_norm(p: LayerNormParams, x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), p.weight, p.bias, p.eps)


def layer_norm_stats(p: LayerNormParams, x: Float[Tensor, "*batch width"]) -> tuple[Tensor, Tensor]:
    """The mean and σ = sqrt(var + eps) that LayerNorm divides by, per vector."""
    mean = x.mean(-1)
    var = x.var(-1, unbiased=False)
    return mean, torch.sqrt(var + p.eps)


def embed(spec: ViTSpec, images: Float[Tensor, "batch 3 h w"]) -> Float[Tensor, "batch token width"]:
    if tuple(images.shape[-2:]) != spec.image_size or images.ndim != 4 or images.shape[1] != 3:
        raise ModelError(
            f"image batch has shape {tuple(images.shape)}, expected [batch, 3, {spec.image_size[0]}, "
            f"{spec.image_size[1]}] for this model"
        )
    patches = F.conv2d(images, spec.patch_weight, spec.patch_bias, stride=spec.patch_size)
    patches = patches.flatten(2).transpose(1, 2)
    cls = spec.class_embedding.expand(images.shape[0], 1, -1)
    x = torch.cat([cls.to(patches.dtype), patches], dim=1) + spec.positional_embedding
    return layer_norm(spec.ln_pre, x) if spec.ln_pre is not None else x


def folded_projection(spec: ViTSpec, convention: str) -> Float[Tensor, "width embed"]:
    """P̃ of the module docstring: ln_post's scale (and centring) folded into the projection."""
    p = spec.ln_post.weight[:, None] * spec.proj
    if convention == "center":
        p = p - p.mean(0, keepdim=True)
    return p


def head_readout(block: BlockParams, p_fold: Float[Tensor, "width embed"]) -> Float[Tensor, "head e embed"]:
    """Per head: value-space vector z ↦ its folded output direction (LayerScale and W_O included)."""
    return torch.einsum("hwe,w,wd->hed", block.w_o, block.ls_1, p_fold)


@dataclass(frozen=True)
class Folding:
    """The input-independent part of the direct-effect readout, for one convention.

    Build it once per model (`folding(spec, convention)`) and pass it to every `decompose` call:
    the per-head readouts cost H·width·e·embed per layer, as much as a few images' forward.
    """

    convention: str
    p_fold: Float[Tensor, "width embed"]
    readouts: Float[Tensor, "layer head e embed"]


def folding(spec: ViTSpec, convention: str) -> Folding:
    if convention not in CONVENTIONS:
        raise ConfigError(f"ln convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    with torch.no_grad():
        p_fold = folded_projection(spec, convention)
        readouts = torch.stack([head_readout(block, p_fold) for block in spec.blocks])
    return Folding(convention, p_fold, readouts)


def _attention(block: BlockParams, y: Tensor, need_cls_row: bool):
    """Full multi-head attention over all tokens; optionally the class-token query row explicitly."""
    b, t, w = y.shape
    h, e = block.w_q.shape[:2]
    w_qkv = torch.cat([block.w_q, block.w_k, block.w_v]).reshape(3 * h * e, w)
    b_qkv = torch.cat([block.b_q, block.b_k, block.b_v]).reshape(3 * h * e)
    q, k, v = F.linear(y, w_qkv, b_qkv).reshape(b, t, 3, h, e).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v)  # [batch head token e]
    cls_attn = None
    if need_cls_row:
        scores = torch.einsum("bhe,bhte->bht", q[:, :, 0], k) * e**-0.5
        cls_attn = scores.softmax(-1)  # [batch head token]
        # The class token's output is taken from the explicit row so the decomposition and the
        # residual stream are the same numbers, not two roundings of them (out is SDPA's own buffer).
        out[:, :, 0] = torch.einsum("bht,bhte->bhe", cls_attn, v)
    return out, cls_attn, v


def decompose(
    spec: ViTSpec,
    images: Float[Tensor, "batch 3 h w"],
    request: DecomposeRequest = DecomposeRequest(),
    *,
    fold: Folding | None = None,
) -> Decomposition:
    """Forward `images` and return the requested terms as a `Decomposition`.

    Always: ``image_embedding`` (= the model's ``encode_image``). direct: `DirectEffects`.
    token_layers: ``tokens`` [sample token_layer head token embed] (sums over tokens to the heads).
    second_order_layers: ``second_order[l]`` (q of docs/methods.md, 1/σ_post included, and the `split`
    shared term). activation_layers: ``activations[l]`` (post-activation MLP values).
    token_sum: ``token_sum`` [sample token embed] = Σ over every layer and head of the per-token terms
    (Σ_t token_sum = Σ heads). attention_layers: ``attention[l]`` [sample head token], the class-token
    query row of layer l's softmax attention.
    """
    req = request.validated(spec)
    if fold is not None and fold.convention != req.convention:
        raise ConfigError(f"folding was built for the {fold.convention!r} convention, the request asks for "
                          f"{req.convention!r}")
    with torch.no_grad():
        if fold is None and (req.direct or req.token_layers or req.token_sum):
            fold = folding(spec, req.convention)
        return _decompose(spec, images.to(spec.dtype), req, fold)


def _decompose(spec: ViTSpec, images: Tensor, req: DecomposeRequest, fold: Folding | None) -> Decomposition:
    n_layers, n_heads = spec.n_layers, spec.n_heads
    first_source = req.second_order_layers[0] if req.second_order_layers else n_layers
    activations: dict[int, Tensor] = {}
    second_order: dict[int, SecondOrderTerms] = {}
    direct: DirectEffects | None = None
    tokens: Tensor | None = None

    x = embed(spec, images)
    n_tokens = x.shape[1]
    emb_cls = x[:, 0]
    z_cls, mlp_cls, self_values, tok_terms = [], [], [], {}
    sources: dict[int, Tensor] = {}  # source layer -> post-activation values [batch token neuron]
    q_parts: dict[int, list[Tensor]] = {l: [] for l in req.second_order_layers}
    attention: dict[int, Tensor] = {}
    token_acc: Tensor | None = None  # Σ_l Σ_h A[0,t]·readout(v_t), before 1/σ_post
    shared_parts: dict[int, list[Tensor]] = {l: [] for l in req.second_order_layers}

    for index, block in enumerate(spec.blocks):
        y = layer_norm(block.ln_1, x)
        needs_row = (req.direct or index > first_source or index in req.token_layers or req.token_sum
                     or index in req.attention_layers)
        attn, cls_attn, v = _attention(block, y, needs_row)
        if index in req.attention_layers:
            attention[index] = cls_attn.clone()
        if req.token_sum:
            part = torch.einsum("bht,bhte,hed->btd", cls_attn, v, fold.readouts[index])
            token_acc = part if token_acc is None else token_acc + part
        if req.direct:
            z_cls.append(attn[:, :, 0].clone())  # a copy: a view would keep every layer's attention alive
            self_values.append(cls_attn[:, :, 0, None] * v[:, :, 0])  # A[0,0]·value of token 0, [batch head e]
        if index in req.token_layers:
            tok_terms[index] = (cls_attn, v)
        if index > first_source:
            mean_t, sigma_t = layer_norm_stats(block.ln_1, x)  # [batch token]
            weights = cls_attn / sigma_t[:, None, :]  # A[0,t] / σ_t
            for source, acts in sources.items():
                q_parts[source].append(torch.einsum("bht,btn->bhn", weights, acts))
                if req.convention == "split":
                    shared_parts[source].append(
                        _shared_value(block, index, spec.blocks[source], cls_attn, mean_t, sigma_t)
                    )
        b, t, _ = x.shape
        w_o = block.w_o.permute(1, 0, 2).reshape(x.shape[-1], -1)
        attn_out = F.linear(attn.transpose(1, 2).reshape(b, t, -1), w_o, block.b_o)
        x = x + block.ls_1 * attn_out
        hidden = activation(block.activation, F.linear(layer_norm(block.ln_2, x), block.w_in, block.b_in))
        mlp = F.linear(hidden, block.w_out, block.b_out)
        if req.direct:
            mlp_cls.append(block.ls_2 * mlp[:, 0])
        if index in req.second_order_layers:
            sources[index] = hidden
        if index in req.activation_layers:
            activations[index] = hidden
        x = x + block.ls_2 * mlp

    final = x[:, 0]
    image_embedding = layer_norm(spec.ln_post, final) @ spec.proj
    mu, sigma = layer_norm_stats(spec.ln_post, final)  # [batch]
    inv_sigma = (1.0 / sigma)[:, None]

    # ln_post's offset Pᵀβ − (μ/σ)·Pᵀγ, of which every `split` term carries its share.
    offset = (spec.ln_post.bias @ spec.proj)[None] - (mu / sigma)[:, None] * (spec.ln_post.weight @ spec.proj)[None]
    k_1 = 2 * n_layers + 1  # split: the embedding, L MLPs and L attention layers

    for source in req.second_order_layers:
        weights = torch.stack(q_parts[source], 1) * inv_sigma[:, :, None, None]
        shared = None
        if req.convention == "split":
            p_fold = folded_projection(spec, "split")
            total = torch.stack(shared_parts[source], 0).sum(0)  # [batch width]
            # Σ over later layers l' and heads h of ln_post's share 1/((1+2l')·k_1·H·N) per (l', h, n).
            post_share = sum(1.0 / (1 + 2 * later) for later in range(source + 1, n_layers)) / (k_1 * spec.mlp_width)
            shared = (total @ p_fold) * inv_sigma + post_share * offset
        second_order[source] = SecondOrderTerms(weights, shared)

    token_sum: Tensor | None = None
    if req.direct or req.token_layers or req.token_sum:
        p_fold, readouts = fold.p_fold, fold.readouts
        split = req.convention == "split"
        if split:
            share = offset / k_1  # [batch embed]: the embedding's, each MLP's and each attention layer's
            # Each layer's out-projection bias (LayerScale included), folded: it lives inside the heads.
            bias_terms = torch.stack([blk.ls_1 * blk.b_o for blk in spec.blocks]) @ p_fold  # [layer embed]
            layer_terms = bias_terms[None] * inv_sigma[:, None] + share[:, None]  # [batch layer embed]
        if req.direct:
            z = torch.stack(z_cls, 1)  # [batch layer head e]
            heads = torch.einsum("blhe,lhed->blhd", z, readouts) * inv_sigma[:, None, None]
            cls_self = torch.einsum("blhe,lhed->bld", torch.stack(self_values, 1), readouts) * inv_sigma[:, None]
            mlps = (torch.stack(mlp_cls, 1) @ p_fold) * inv_sigma[:, None]
            embedding = (emb_cls @ p_fold) * inv_sigma
            if split:
                heads = heads + (layer_terms / n_heads)[:, :, None]
                cls_self = cls_self + layer_terms / n_tokens  # Σ_h of the token-0 terms' 1/(H·T)
                mlps = mlps + share[:, None]
                embedding = embedding + share
                bias = torch.zeros_like(embedding)
            else:
                biases = torch.stack([blk.ls_1 * blk.b_o for blk in spec.blocks]).sum(0)
                bias = (biases @ p_fold)[None] * inv_sigma + (spec.ln_post.bias @ spec.proj)[None]
            direct = DirectEffects(embedding=embedding, mlps=mlps, heads=heads, bias=bias, cls_token=cls_self)
        if req.token_layers:
            terms = []
            for layer in req.token_layers:
                cls_attn, v = tok_terms[layer]
                t = torch.einsum("bht,bhte,hed->bhtd", cls_attn, v, readouts[layer]) * inv_sigma[:, None, None]
                if split:
                    t = t + (layer_terms[:, layer] / (n_heads * n_tokens))[:, None, None]
                terms.append(t)
            tokens = torch.stack(terms, 1)
        if req.token_sum:
            token_sum = token_acc * inv_sigma[:, None]
            if split:  # each (token, head) term of layer l carries layer_terms[l]/(H·T): Σ_{l,h} → Σ_l /T
                token_sum = token_sum + (layer_terms.sum(1) / n_tokens)[:, None]
    return Decomposition(image_embedding, direct, tokens, second_order, activations, token_sum, attention)


def _shared_value(
    block: BlockParams, index: int, source: BlockParams, cls_attn: Tensor, mean_t: Tensor, sigma_t: Tensor
) -> Tensor:
    """One neuron's neuron-independent part of later layer `index`'s class-token attention output
    (split convention, docs/methods.md), the same for each of the N neurons of the `source` layer.

    Per neuron, with s = 1/((1+2l')·N) (l' = `index`, 0-based): the source MLP's output bias enters
    as ls₂⊙b_out/N at every token; ln₁ subtracts s·μ_t, scales by γ₁/σ_t and adds s·β₁; the value
    adds s·b_V; the out-projection adds s·b_O/H per head (s·b_O over the H heads). These flow
    through the frozen class-token attention row like any value (Σ_t A[0,t] = 1). Returned in the
    residual basis ([batch width]), before ln_post folding (whose own shares the caller adds).
    """
    s = 1.0 / (1 + 2 * index)  # the share of the embedding + 2l' components, times N (divided below)
    n_neurons = source.w_out.shape[1]
    inv_sigma = 1.0 / sigma_t  # [batch token]
    a_inv_sigma = torch.einsum("bht,bt->bh", cls_attn, inv_sigma)  # Σ_t A[0,t]/σ_t
    a_mu = torch.einsum("bht,bt->bh", cls_attn, mean_t * inv_sigma)  # Σ_t A[0,t]·μ_t/σ_t
    gamma, beta = block.ln_1.weight, block.ln_1.bias
    write = gamma * source.ls_2 * source.b_out  # the output bias's write at ln₁, before 1/σ_t
    attended = (a_inv_sigma[..., None] * write + s * (beta - a_mu[..., None] * gamma)) / n_neurons  # [b h w]
    values = torch.einsum("bhw,hew->bhe", attended, block.w_v) + s * block.b_v / n_neurons
    out = torch.einsum("bhe,hwe->bw", values, block.w_o) + s * block.b_o / n_neurons
    return block.ls_1 * out


def second_order_directions(
    spec: ViTSpec, layer: int, convention: str = "split"
) -> Float[Tensor, "later_layer head neuron embed"]:
    """D of docs/methods.md for every neuron of `layer`: input-independent, one slab per later layer."""
    (layer,) = check_layers(spec, [layer], "second-order layer")
    if convention not in CONVENTIONS:
        raise ConfigError(f"ln convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    if layer == spec.n_layers - 1:
        raise ConfigError(f"second-order layer {layer} is the last layer and has no later attention layer")
    src = spec.blocks[layer]
    writes = src.ls_2[:, None] * src.w_out  # [width neuron]
    if convention == "center":
        writes = writes - writes.mean(0, keepdim=True)
    p_fold = folded_projection(spec, convention)
    slabs = []
    for block in spec.blocks[layer + 1 :]:
        values = torch.einsum("hew,wn->hen", block.w_v, block.ln_1.weight[:, None] * writes)
        slabs.append(torch.einsum("hen,hed->hnd", values, head_readout(block, p_fold)))
    return torch.stack(slabs)


def second_order_effects(
    weights: Float[Tensor, "batch later_layer head neuron"],
    directions: Float[Tensor, "later_layer head neuron embed"],
    shared: Float[Tensor, "batch embed"] | None = None,
    neurons: Tensor | None = None,
) -> Float[Tensor, "batch neuron embed"]:
    """φ_n(I) = Σ_{l',h} q · D (+ the split convention's shared term), for chosen neurons only."""
    if neurons is not None:
        weights, directions = weights[..., neurons], directions[:, :, neurons]
    phi = torch.einsum("blhn,lhnd->bnd", weights, directions)
    return phi if shared is None else phi + shared[:, None]
