"""`direct/token_sum` and the class-token attention rows (spec S13): the per-token sum over every
layer and head obeys the decomposition identity against the model's own `encode_image`, equals the
per-layer token terms summed, and the attention rows are the model's own attention weights."""

import copy

import pytest
import torch

from clipscope.kernels.decompose import DecomposeRequest, decompose


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("convention", ["split", "center"])
@pytest.mark.parametrize("name", ["clipscope-tiny", "clipscope-tiny-ls"])
def test_token_sum_identity_and_equality_with_the_token_terms(model_cache, name, convention):
    loaded = model_cache(name)
    spec = loaded.spec
    images = torch.randn(3, 3, *spec.image_size, generator=torch.Generator().manual_seed(1))
    every = tuple(range(spec.n_layers))
    out = decompose(spec, images, DecomposeRequest(convention=convention, token_layers=every, token_sum=True))
    with torch.no_grad():
        reference = loaded.model.encode_image(images)
    d = out.direct
    total = out.token_sum.sum(1) + d.mlps.sum(1) + d.embedding + d.bias
    assert rel_err(total, reference) <= 1e-5
    assert rel_err(out.token_sum, out.tokens.sum((1, 2))) <= 1e-5
    assert out.token_sum.shape == (3, spec.n_tokens, spec.embed_dim)


def test_attention_rows_are_the_models_own_attention_weights(model_cache):
    loaded = model_cache("clipscope-tiny")
    model = copy.deepcopy(loaded.model)
    images = torch.randn(2, 3, *loaded.spec.image_size, generator=torch.Generator().manual_seed(2))
    layers = (0, loaded.spec.n_layers - 1)
    out = decompose(loaded.spec, images, DecomposeRequest(direct=False, attention_layers=layers))
    assert out.token_sum is None and sorted(out.attention) == list(layers)
    for layer in layers:
        block = model.visual.transformer.resblocks[layer]
        captured = {}
        handle = block.ln_1.register_forward_hook(lambda module, inputs, output: captured.setdefault("y", output))
        with torch.no_grad():
            model.encode_image(images)
            y = captured["y"]
            _, weights = block.attn(y, y, y, need_weights=True, average_attn_weights=False)
        handle.remove()
        assert rel_err(out.attention[layer], weights[:, :, 0]) <= 1e-5
