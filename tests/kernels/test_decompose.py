"""docs/methods.md identities: the decomposition sums to encode_image; second order equals brute force."""

import copy

import pytest
import torch

from clipscope.errors import ConfigError, ModelError
from clipscope.kernels.decompose import (
    DecomposeRequest,
    decompose,
    second_order_directions,
    second_order_effects,
)

TINY = ["clipscope-tiny", "clipscope-tiny-quickgelu", "clipscope-tiny-ls"]
ALL = TINY + ["ViT-B-32", "ViT-B-16"]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


def model_and_spec(model_cache, name, dtype):
    loaded = model_cache(name)
    model = copy.deepcopy(loaded.model).to(dtype)
    return model, loaded.spec.to(dtype=dtype)


def images_for(spec, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *spec.image_size, generator=g, dtype=spec.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("convention", ["split", "center"])
@pytest.mark.parametrize("name", ALL)
def test_direct_effects_sum_to_encode_image(model_cache, name, convention, dtype):
    model, spec = model_and_spec(model_cache, name, dtype)
    images = images_for(spec, 2)
    last = spec.n_layers - 1
    out = decompose(spec, images, DecomposeRequest(convention=convention, token_layers=(0, last)))
    with torch.no_grad():
        ref = model.encode_image(images)
    total = out.direct.embedding + out.direct.mlps.sum(1) + out.direct.heads.sum((1, 2)) + out.direct.bias
    assert rel_err(out.image_embedding, ref) <= TOL[dtype]
    assert rel_err(total, ref) <= TOL[dtype]
    assert out.direct.heads.shape == (2, spec.n_layers, spec.n_heads, spec.embed_dim)
    assert out.tokens.shape == (2, 2, spec.n_heads, spec.n_tokens, spec.embed_dim)
    # per-token terms sum over tokens to the per-head terms of their layers
    assert rel_err(out.tokens.sum(3), out.direct.heads[:, [0, last]]) <= TOL[dtype]


def test_conventions_differ_but_both_sum(model_cache):
    _, spec = model_and_spec(model_cache, "clipscope-tiny", torch.float64)
    images = images_for(spec, 3)
    split = decompose(spec, images, DecomposeRequest(convention="split"))
    center = decompose(spec, images, DecomposeRequest(convention="center"))
    assert not torch.allclose(split.direct.heads, center.direct.heads)
    # centre-convention terms carry no share of the mean: a constant residual vector maps to 0
    assert torch.allclose(split.image_embedding, center.image_embedding)


def test_extraction_leaves_model_unchanged(model_cache):
    model, spec = model_and_spec(model_cache, "clipscope-tiny-ls", torch.float32)
    images = images_for(spec, 2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model.encode_image(images)
    decompose(spec, images, DecomposeRequest(token_layers=(1,), second_order_layers=(0,), activation_layers=(1,)))
    with torch.no_grad():
        after = model.encode_image(images)
    assert torch.equal(before, after)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def _trace(model, images, source):
    """Run the real open_clip model and capture what a brute-force second-order pass needs."""
    visual = model.visual
    blocks = visual.transformer.resblocks
    captured = {}
    hooks = [blocks[i].register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(("in", i), a[0]))
             for i in range(len(blocks))]
    hooks.append(blocks[source].mlp.gelu.register_forward_hook(lambda m, a, o: captured.__setitem__("act", o)))
    hooks.append(visual.ln_post.register_forward_pre_hook(lambda m, a: captured.__setitem__("final", a[0])))
    with torch.no_grad():
        model.encode_image(images)
    for h in hooks:
        h.remove()
    return captured


def _brute_force_phi(model, captured, source, neurons, convention):
    """Push each neuron's write e_t = p_t · ls₂ ⊙ w_out through the frozen later attention layers.

    Under `split` (docs/methods.md, l' 0-based, N neurons, H heads, s = 1/((1+2l')·N)) the neuron also
    writes ls₂ ⊙ b_out/N; ln₁ subtracts s·μ_t and adds s·β₁; the value adds s·b_V, the out-projection
    s·b_O/H per head; ln_post's mean and β enter with s/((1+2L)·H) per head."""
    visual = model.visual
    blocks = visual.transformer.resblocks
    n_layers = len(blocks)
    ctr = (lambda v: v - v.mean(-1, keepdim=True)) if convention == "center" else (lambda v: v)
    src = blocks[source]
    n_neurons = src.mlp.c_fc.out_features
    ls2 = src.ls_2.gamma if hasattr(src.ls_2, "gamma") else torch.ones(src.mlp.c_proj.out_features, dtype=captured["act"].dtype)
    final = captured["final"][:, 0]
    mu_post = final.mean(-1, keepdim=True)
    sigma_post = torch.sqrt(final.var(-1, unbiased=False) + visual.ln_post.eps)
    offset_post = (visual.ln_post.bias - visual.ln_post.weight * mu_post / sigma_post[:, None]) @ visual.proj
    results = []
    for n in neurons:
        write = ls2 * src.mlp.c_proj.weight[:, n]  # [width]
        total = 0
        shared = 0
        post_share = 0
        for later in range(source + 1, n_layers):
            blk = blocks[later]
            x_in = captured[("in", later)]
            mu_t = x_in.mean(-1, keepdim=True)
            sigma_t = torch.sqrt(x_in.var(-1, unbiased=False, keepdim=True) + blk.ln_1.eps)
            y = blk.ln_1(x_in)
            _, attn = blk.attn(y, y, y, need_weights=True, average_attn_weights=False)
            a_cls = attn[:, :, 0, :]  # [batch head token]
            e = captured["act"][:, :, n, None] * write  # [batch token width]
            lin = blk.ln_1.weight * ctr(e) / sigma_t
            heads, width = blk.attn.num_heads, blk.attn.embed_dim
            hd = width // heads
            w_v = blk.attn.in_proj_weight[2 * width:].reshape(heads, hd, width)
            b_v = blk.attn.in_proj_bias[2 * width:].reshape(heads, hd)
            w_o = blk.attn.out_proj.weight.reshape(width, heads, hd)
            ls1 = blk.ls_1.gamma if hasattr(blk.ls_1, "gamma") else torch.ones(width, dtype=e.dtype)
            s = 1.0 / ((1 + 2 * later) * n_neurons)
            post_share = post_share + s / (1 + 2 * n_layers)
            for h in range(heads):
                z = torch.einsum("bt,btw,ew->be", a_cls[:, h], lin, w_v[h])
                total = total + ls1 * (z @ w_o[:, h].T)
                offset = s * (blk.ln_1.bias - blk.ln_1.weight * mu_t / sigma_t)
                offset = offset + blk.ln_1.weight * ls2 * src.mlp.c_proj.bias / n_neurons / sigma_t
                z_shared = torch.einsum("bt,btw,ew->be", a_cls[:, h], offset, w_v[h]) + s * b_v[h]
                shared = shared + ls1 * (z_shared @ w_o[:, h].T + s * blk.attn.out_proj.bias / heads)
        phi = (visual.ln_post.weight * ctr(total) / sigma_post[:, None]) @ visual.proj
        if convention == "split":
            phi = phi + (visual.ln_post.weight * shared / sigma_post[:, None]) @ visual.proj + post_share * offset_post
        results.append(phi)
    return torch.stack(results, 1)  # [batch neuron embed]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("convention", ["split", "center"])
@pytest.mark.parametrize("name,source", [("clipscope-tiny", 0), ("clipscope-tiny", 2),
                                         ("clipscope-tiny-ls", 0), ("clipscope-tiny-quickgelu", 1),
                                         ("ViT-B-32", 9)])
def test_second_order_equals_brute_force(model_cache, name, source, convention, dtype):
    model, spec = model_and_spec(model_cache, name, dtype)
    images = images_for(spec, 2, seed=1)
    out = decompose(spec, images, DecomposeRequest(direct=False, second_order_layers=(source,), convention=convention))
    weights = out.second_order[source].weights
    assert weights.shape == (2, spec.n_layers - source - 1, spec.n_heads, spec.mlp_width)
    directions = second_order_directions(spec, source, convention)
    neurons = torch.tensor([0, 3, spec.mlp_width // 2, spec.mlp_width - 1])
    shared = out.second_order[source].shared
    assert (shared is not None) == (convention == "split")
    phi = second_order_effects(weights, directions, shared, neurons)
    ref = _brute_force_phi(model, _trace(model, images, source), source, neurons.tolist(), convention)
    assert rel_err(phi, ref) <= 10 * TOL[dtype]


def test_second_order_gram_norm_equals_direct_norm(model_cache):
    _, spec = model_and_spec(model_cache, "clipscope-tiny", torch.float64)
    images = images_for(spec, 4, seed=2)
    out = decompose(spec, images, DecomposeRequest(direct=False, second_order_layers=(1,), convention="center"))
    q = out.second_order[1].weights  # [batch later head neuron]
    d = second_order_directions(spec, 1, "center")  # [later head neuron embed]
    flat_q = q.flatten(1, 2)  # [batch later·head neuron]
    flat_d = d.flatten(0, 1)  # [later·head neuron embed]
    gram = torch.einsum("pne,qne->npq", flat_d, flat_d)
    via_gram = torch.einsum("bpn,npq,bqn->bn", flat_q, gram, flat_q)
    direct = second_order_effects(q, d).pow(2).sum(-1)
    assert rel_err(via_gram, direct) <= 1e-12


def test_activation_layers_match_model(model_cache):
    model, spec = model_and_spec(model_cache, "clipscope-tiny", torch.float64)
    images = images_for(spec, 2)
    out = decompose(spec, images, DecomposeRequest(direct=False, activation_layers=(2,)))
    ref = _trace(model, images, 2)["act"]
    assert rel_err(out.activations[2], ref) <= 1e-12


def test_bad_image_size_is_refused(model_cache):
    _, spec = model_and_spec(model_cache, "clipscope-tiny", torch.float32)
    with pytest.raises(ModelError, match=r"expected \[batch, 3, 64, 64\]"):
        decompose(spec, torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("field,value,pattern", [
    ("token_layers", (4,), r"token layers: layer 4 is out of range; this model has layers 0..3"),
    ("second_order_layers", (-1,), r"second-order layers: layer -1 is out of range"),
    ("activation_layers", (7,), r"activation layers: layer 7 is out of range"),
])
def test_layer_out_of_range_is_refused(model_cache, field, value, pattern):
    _, spec = model_and_spec(model_cache, "clipscope-tiny", torch.float32)
    with pytest.raises(ModelError, match=pattern):
        decompose(spec, images_for(spec, 1), DecomposeRequest(**{field: value}))


def test_last_layer_has_no_second_order_and_convention_is_checked(model_cache):
    _, spec = model_and_spec(model_cache, "clipscope-tiny", torch.float32)
    with pytest.raises(ConfigError, match="last layer"):
        decompose(spec, images_for(spec, 1), DecomposeRequest(second_order_layers=(3,)))
    with pytest.raises(ConfigError, match="ln convention must be one of split, center, got 'mean'"):
        decompose(spec, images_for(spec, 1), DecomposeRequest(convention="mean"))


def test_precomputed_folding_gives_the_same_terms_and_checks_convention(model_cache):
    from clipscope.kernels.decompose import folding

    _, spec = model_and_spec(model_cache, "clipscope-tiny", torch.float64)
    images = images_for(spec, 2)
    request = DecomposeRequest(convention="center", token_layers=(3,))
    fresh = decompose(spec, images, request)
    reused = decompose(spec, images, request, fold=folding(spec, "center"))
    for name in ("embedding", "mlps", "heads", "bias", "cls_token"):
        assert torch.equal(getattr(fresh.direct, name), getattr(reused.direct, name)), name
    assert torch.equal(fresh.tokens, reused.tokens) and torch.equal(fresh.image_embedding, reused.image_embedding)
    with pytest.raises(ConfigError, match="folding was built for the 'split' convention"):
        decompose(spec, images, request, fold=folding(spec, "split"))
