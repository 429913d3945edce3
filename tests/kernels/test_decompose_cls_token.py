"""`direct/cls_token` (the class token attended from itself) equals token 0 of the per-token terms
summed over heads, in both conventions, and is computed from the attention weights, not hooks."""

import copy

import pytest
import torch

from clipscope.kernels.decompose import DecomposeRequest, decompose, folding

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("convention", ["split", "center"])
@pytest.mark.parametrize("name", ["clipscope-tiny", "clipscope-tiny-ls"])
def test_cls_token_is_token_zero_summed_over_heads(model_cache, name, convention, dtype):
    spec = model_cache(name).spec.to(dtype=dtype)
    images = torch.randn(3, 3, *spec.image_size, generator=torch.Generator().manual_seed(1), dtype=dtype)
    layers = tuple(range(spec.n_layers))
    out = decompose(spec, images, DecomposeRequest(convention=convention, token_layers=layers),
                    fold=folding(spec, convention))
    cls = out.direct.cls_token
    assert cls.shape == (3, spec.n_layers, spec.embed_dim) and cls.dtype == dtype
    assert rel_err(cls, out.tokens[:, :, :, 0].sum(2)) <= TOL[dtype]
    # not a trivial slice of something else: it differs from the per-layer head sums
    assert rel_err(cls, out.direct.heads.sum(2)) > 1e-2
    # without token layers the same values come out (the term needs no per-token storage)
    alone = decompose(spec, images, DecomposeRequest(convention=convention))
    assert alone.tokens is None
    assert rel_err(alone.direct.cls_token, cls) <= TOL[dtype]


def test_cls_token_matches_attention_from_the_live_model(model_cache):
    """Recompute A[0,0]·W_O W_V ln_1(x_0) from nn.MultiheadAttention's own per-head weights."""
    loaded = model_cache("clipscope-tiny-ls")
    visual = copy.deepcopy(loaded.model.visual).double().eval()
    spec = loaded.spec.to(dtype=torch.float64)
    images = torch.randn(2, 3, *spec.image_size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    captured: dict[str, torch.Tensor] = {}
    hooks = [block.ln_1.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(f"y{i}", o))
             for i, block in enumerate(visual.transformer.resblocks)]
    hooks.append(visual.ln_post.register_forward_pre_hook(lambda m, a: captured.__setitem__("final", a[0])))
    with torch.no_grad():
        visual(images)
        for h in hooks:
            h.remove()
        final = captured["final"][:, 0]
        mu, sigma = final.mean(-1), torch.sqrt(final.var(-1, unbiased=False) + visual.ln_post.eps)
        n_layers, n_heads, width = spec.n_layers, spec.n_heads, spec.width
        k = 2 * n_layers + 1  # split: embedding, L MLPs, L attention layers (docs/methods.md)
        tokens = captured["y0"].shape[1]
        gamma, beta, proj = visual.ln_post.weight, visual.ln_post.bias, visual.proj
        expected = []
        for i, block in enumerate(visual.transformer.resblocks):
            y = captured[f"y{i}"]
            attn = block.attn
            _, weights = attn(y, y, y, need_weights=True, average_attn_weights=False)  # [batch head q k]
            v = y @ attn.in_proj_weight[2 * width:].T + attn.in_proj_bias[2 * width:]
            v = v.reshape(*v.shape[:2], n_heads, -1)  # [batch token head e]
            per_head = weights[:, :, 0, 0, None] * v[:, 0]  # [batch head e]
            w_o = attn.out_proj.weight.reshape(width, n_heads, -1)  # [width head e]
            c = torch.einsum("bhe,whe->bhw", per_head, w_o)  # [batch head width]
            # each (token 0, head) term carries b_O/(H·T) and the share 1/(K₁·H·T); Σ over heads:
            c = (c + attn.out_proj.bias / (n_heads * tokens)) * block.ls_1.gamma
            share = n_heads / (k * n_heads * tokens)
            centred = c.sum(1) - share * mu[:, None]
            expected.append((gamma * centred / sigma[:, None] + share * beta) @ proj)
        expected = torch.stack(expected, 1)
    got = decompose(spec, images).direct.cls_token
    assert rel_err(got, expected) <= 1e-12
