"""A literal, loop-by-loop re-implementation of the `split` ln_post convention (docs/methods.md), the
test oracle of that convention.

Written from the contract's words, not from the kernel: it works on the open_clip module itself
(its weights and submodules, never a `ViTSpec`), loops over layers, heads, tokens and neurons,
and applies every share where the contract puts it. Slow by design; tiny models only.

Used by tests/kernels/test_split_reference.py (against the kernel) and by the store-level test of
the extract job (against what a store holds), hence a module of its own.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def randomized_affine(model: nn.Module, seed: int = 0, scale: float = 0.5) -> nn.Module:
    """A float64 copy of an open_clip model whose every bias, LayerNorm gain/bias and LayerScale is
    random and non-zero (random-init models have zero biases and unit gains, which hides shares)."""
    out = copy.deepcopy(model).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in out.visual.named_parameters():
            if name.endswith("bias") or ".ln_" in f".{name}" or name.startswith("ln_") or "ls_" in name:
                noise = torch.randn(param.shape, generator=g, dtype=param.dtype) * scale
                if name.endswith("bias"):
                    param.copy_(noise)
                else:  # gains: around 1, never 0
                    param.copy_(1.0 + noise.clamp(-0.8, 0.8))
    return out


def _per_head(block: nn.Module):
    attn = block.attn
    width, heads = attn.embed_dim, attn.num_heads
    e = width // heads
    w_q, w_k, w_v = attn.in_proj_weight.reshape(3, heads, e, width)
    b_q, b_k, b_v = attn.in_proj_bias.reshape(3, heads, e)
    w_o = attn.out_proj.weight.reshape(width, heads, e)  # column block h of W_O is head h's
    b_o = attn.out_proj.bias
    return heads, e, w_q, w_k, w_v, b_q, b_k, b_v, w_o, b_o


def _scale(module: nn.Module, width: int, like: torch.Tensor) -> torch.Tensor:
    gamma = getattr(module, "gamma", None)
    return gamma if gamma is not None else torch.ones(width, dtype=like.dtype)


def _cls_attention(block: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A^{h}[0, t] of one layer from its weights: [batch head token]."""
    heads, e, w_q, w_k, _, b_q, b_k, *_ = _per_head(block)
    rows = []
    for h in range(heads):
        q = y[:, 0] @ w_q[h].T + b_q[h]  # [batch e]
        k = y @ w_k[h].T + b_k[h]  # [batch token e]
        rows.append(torch.softmax(torch.einsum("be,bte->bt", q, k) / e**0.5, dim=-1))
    return torch.stack(rows, 1)


def _ln_stats(x: torch.Tensor, eps: float):
    mu = x.mean(-1)
    return mu, torch.sqrt(((x - mu[..., None]) ** 2).mean(-1) + eps)


def trace(visual: nn.Module, images: torch.Tensor) -> dict:
    """Run the tower block by block through its own modules and keep every block's input, each
    MLP's post-activation values, each MLP's write and the final residual stream."""
    blocks = visual.transformer.resblocks
    with torch.no_grad():
        x = visual._embeds(images)
        inputs, acts, mlp_writes, attn_writes = [], [], [], []
        for block in blocks:
            inputs.append(x)
            attn_out = block.ls_1(block.attention(q_x=block.ln_1(x)))
            attn_writes.append(attn_out)
            x = x + attn_out
            hidden = block.mlp.gelu(block.mlp.c_fc(block.ln_2(x)))
            acts.append(hidden)
            write = block.ls_2(block.mlp.c_proj(hidden))
            mlp_writes.append(write)
            x = x + write
        return {"inputs": inputs, "acts": acts, "mlp_writes": mlp_writes, "attn_writes": attn_writes, "final": x}


def reference_direct(visual: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """First order under `split`, term by term: K₁ = 2L + 1; the embedding and each MLP get the share
    1/K₁ of ln_post's mean and β; each (token t, head h) term of layer l is c_{t,l,h} + b_O/(H·T)
    (LayerScale applied to both) with the share 1/(K₁·H·T). Returns the store's arrays
    (``direct/tokens`` for every layer) and the residual of the sum against ``x^L_0``."""
    blocks = visual.transformer.resblocks
    n_layers = len(blocks)
    k_1 = 2 * n_layers + 1
    tr = trace(visual, images)
    final = tr["final"][:, 0]
    mu, sigma = _ln_stats(final, visual.ln_post.eps)
    gamma, beta, proj = visual.ln_post.weight, visual.ln_post.bias, visual.proj

    def fold(c: torch.Tensor, share: float) -> torch.Tensor:
        return (gamma * (c - share * mu[:, None]) / sigma[:, None] + share * beta) @ proj

    with torch.no_grad():
        residual = tr["inputs"][0][:, 0].clone()  # the sum of the raw components, to check them
        embedding = fold(tr["inputs"][0][:, 0], 1.0 / k_1)
        mlps, tokens = [], []
        for index, block in enumerate(blocks):
            x = tr["inputs"][index]
            y = block.ln_1(x)
            heads, e, _, _, w_v, _, _, b_v, w_o, b_o = _per_head(block)
            ls_1 = _scale(block.ls_1, x.shape[-1], x)
            attention = _cls_attention(block, y)
            n_tokens = x.shape[1]
            layer_terms = []
            for h in range(heads):
                head_terms = []
                for t in range(n_tokens):
                    value = y[:, t] @ w_v[h].T + b_v[h]  # [batch e]
                    c = ls_1 * (attention[:, h, t, None] * value @ w_o[:, h].T + b_o / (heads * n_tokens))
                    residual = residual + c
                    head_terms.append(fold(c, 1.0 / (k_1 * heads * n_tokens)))
                layer_terms.append(torch.stack(head_terms, 1))
            tokens.append(torch.stack(layer_terms, 1))  # [batch head token embed]
            mlp = tr["mlp_writes"][index][:, 0]
            residual = residual + mlp
            mlps.append(fold(mlp, 1.0 / k_1))
        tokens_t = torch.stack(tokens, 1)  # [batch layer head token embed]
        image_embedding = visual.ln_post(tr["final"])[:, 0] @ proj
    return {
        "image_embedding": image_embedding,
        "direct/embedding": embedding,
        "direct/mlps": torch.stack(mlps, 1),
        "direct/heads": tokens_t.sum(3),
        "direct/tokens": tokens_t,
        "direct/cls_token": tokens_t[:, :, :, 0].sum(2),
        "direct/bias": torch.zeros_like(embedding),
        "residual_error": (residual - final).abs().max() / final.abs().max(),
    }


def reference_second_order(visual: nn.Module, images: torch.Tensor, source: int, neurons) -> torch.Tensor:
    """Second order under `split`, neuron by neuron, later layer by later layer, head by head, token
    by token (l, l' 0-based; N neurons, H heads): neuron n writes ls₂ ⊙ (p_{t,n}·w_out_n + b_out/N) at
    token t; at ln₁ of layer l' it enters uncentred, minus μ_t/((1+2l')·N), times γ₁/σ_t, plus
    β₁/((1+2l')·N); the value adds b_V^h/((1+2l')·N); after the frozen class-token attention row and
    W_O^h the out-projection adds b_O/((1+2l')·H·N) (LayerScale applied); ln_post subtracts
    μ_post/((1+2l')(1+2L)·H·N), multiplies by γ_post/σ_post and adds β_post/((1+2l')(1+2L)·H·N);
    then Pᵀ. φ_n is the sum over l' > l and h. Returns [batch neuron embed]."""
    blocks = visual.transformer.resblocks
    n_layers = len(blocks)
    tr = trace(visual, images)
    final = tr["final"][:, 0]
    mu_post, sigma_post = _ln_stats(final, visual.ln_post.eps)
    gamma_post, beta_post, proj = visual.ln_post.weight, visual.ln_post.bias, visual.proj
    src = blocks[source]
    w_out, b_out = src.mlp.c_proj.weight, src.mlp.c_proj.bias
    n_neurons = w_out.shape[1]
    ls_2 = _scale(src.ls_2, w_out.shape[0], w_out)
    acts = tr["acts"][source]  # [batch token neuron]
    results = []
    with torch.no_grad():
        for n in neurons:
            phi = 0.0
            for later in range(source + 1, n_layers):
                block = blocks[later]
                x = tr["inputs"][later]
                mu_t, sigma_t = _ln_stats(x, block.ln_1.eps)  # [batch token]
                attention = _cls_attention(block, block.ln_1(x))
                heads, e, _, _, w_v, _, _, b_v, w_o, b_o = _per_head(block)
                ls_1 = _scale(block.ls_1, x.shape[-1], x)
                gamma_1, beta_1 = block.ln_1.weight, block.ln_1.bias
                s_in = 1.0 / ((1 + 2 * later) * n_neurons)
                s_post = 1.0 / ((1 + 2 * later) * (1 + 2 * n_layers) * heads * n_neurons)
                for h in range(heads):
                    z = 0.0
                    for t in range(x.shape[1]):
                        write = ls_2 * (acts[:, t, n, None] * w_out[:, n] + b_out / n_neurons)  # [batch width]
                        ln_in = gamma_1 * (write - s_in * mu_t[:, t, None]) / sigma_t[:, t, None] + s_in * beta_1
                        value = ln_in @ w_v[h].T + s_in * b_v[h]
                        z = z + attention[:, h, t, None] * value
                    out = ls_1 * (z @ w_o[:, h].T + s_in * b_o / heads)
                    post = gamma_post * (out - s_post * mu_post[:, None]) / sigma_post[:, None] + s_post * beta_post
                    phi = phi + post @ proj
            results.append(phi)
    return torch.stack(results, 1)
