"""The `split` convention equals the literal reference procedure of docs/methods.md term for term,
first and second order, on tiny models whose every bias, LayerNorm gain/bias and LayerScale is random
and non-zero (so every share matters). Kernel in float32 (and float64) against the float64 oracle
of `split_reference.py`."""

import copy

import pytest
import torch

from clipscope.kernels.decompose import (
    DecomposeRequest,
    decompose,
    second_order_directions,
    second_order_effects,
)
from clipscope.pipelines.models.open_clip_adapter import vit_spec_from_open_clip
from split_reference import randomized_affine, reference_direct, reference_second_order

TINY = ["clipscope-tiny", "clipscope-tiny-quickgelu", "clipscope-tiny-ls"]
TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
# The oracle's names for the decomposition's fields.
ARRAYS = {
    "image_embedding": lambda out: out.image_embedding, "direct/embedding": lambda out: out.direct.embedding,
    "direct/mlps": lambda out: out.direct.mlps, "direct/heads": lambda out: out.direct.heads,
    "direct/tokens": lambda out: out.tokens, "direct/cls_token": lambda out: out.direct.cls_token,
}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest deviation relative to the largest reference value (the measure TOL bounds)."""
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.fixture(scope="module")
def randomized(model_cache):
    cache = {}

    def get(name):
        if name not in cache:
            model = randomized_affine(model_cache(name).model, seed=20)
            cache[name] = (model, vit_spec_from_open_clip(model.visual))
        return cache[name]

    return get


def _images(spec, n=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *spec.image_size, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", TINY)
def test_first_order_split_equals_the_literal_reference(randomized, name, dtype):
    model, spec64 = randomized(name)
    images = _images(spec64)
    ref = reference_direct(model.visual, images)
    assert ref["residual_error"] <= 1e-13  # the oracle's components sum to x^L_0
    spec = spec64.to(dtype=dtype)
    layers = tuple(range(spec.n_layers))
    out = decompose(spec, images.to(dtype), DecomposeRequest(convention="split", token_layers=layers))
    for key, field_of in ARRAYS.items():
        got = field_of(out)
        assert got.shape == ref[key].shape, key
        assert rel_err(got, ref[key]) <= TOL[dtype], (key, rel_err(got, ref[key]))
    # nothing is left for direct/bias (the model has no projection bias)
    assert torch.equal(out.direct.bias, torch.zeros_like(out.direct.bias))
    # identity: the terms still sum to encode_image
    with torch.no_grad():
        encoded = copy.deepcopy(model).to(dtype).encode_image(images.to(dtype))
    total = out.direct.embedding + out.direct.mlps.sum(1) + out.direct.heads.sum((1, 2)) + out.direct.bias
    assert rel_err(total, encoded) <= 10 * TOL[dtype]
    assert rel_err(ref["direct/embedding"] + ref["direct/mlps"].sum(1) + ref["direct/heads"].sum((1, 2)),
                   ref["image_embedding"]) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,source", [("clipscope-tiny", 0), ("clipscope-tiny", 2), ("clipscope-tiny-ls", 0),
                                         ("clipscope-tiny-ls", 1), ("clipscope-tiny-quickgelu", 1)])
def test_second_order_split_equals_the_literal_reference(randomized, name, source, dtype):
    model, spec64 = randomized(name)
    images = _images(spec64, seed=6)
    neurons = [0, 1, spec64.mlp_width // 3, spec64.mlp_width - 1]
    ref = reference_second_order(model.visual, images, source, neurons)
    spec = spec64.to(dtype=dtype)
    out = decompose(spec, images.to(dtype), DecomposeRequest(direct=False, second_order_layers=(source,)))
    phi = second_order_effects(out.second_order[source].weights, second_order_directions(spec, source),
                               out.second_order[source].shared, torch.tensor(neurons))
    assert phi.shape == ref.shape
    assert rel_err(phi, ref) <= TOL[dtype], rel_err(phi, ref)


def test_every_share_matters(randomized):
    """The randomized model makes each share visible: dropping the out-projection bias from the heads,
    or giving ln_post's offset to heads and biases as the old `split` convention did, moves the
    terms far beyond the tolerance."""
    model, spec = randomized("clipscope-tiny")
    images = _images(spec)
    out = decompose(spec, images, DecomposeRequest(convention="split"))
    ref = reference_direct(model.visual, images)
    n_layers, n_heads = spec.n_layers, spec.n_heads
    old_k = 1 + 2 * n_layers + n_layers * n_heads
    new_k = 2 * n_layers + 1
    # the heads' ln_post share alone is 1/(K₁·H) = 1/36 now and was 1/K = 1/25
    assert abs(1 / (new_k * n_heads) - 1 / old_k) > 1e-2
    center = decompose(spec, images, DecomposeRequest(convention="center"))
    assert rel_err(center.direct.heads, ref["direct/heads"]) > 1e-2
    assert rel_err(out.direct.heads, ref["direct/heads"]) <= 1e-12
