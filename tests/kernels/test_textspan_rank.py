"""`span_rank="auto"` = min(80, numerical rank of the head's statistics) keeps TextSpan's
picks out of float noise: they are stable under noise of 1e-7 relative to the data, where a span
rank past the numerical rank (the reference default 80 on a narrow head) is not. An integer is used
literally."""

import numpy as np
import pytest
import torch

from clipscope.errors import ConfigError, DataError
from clipscope.kernels.decompose import DecomposeRequest, decompose
from clipscope.kernels.textspan import (
    REFERENCE_SPAN_RANK,
    numerical_rank,
    resolve_span_rank,
    textspan,
    textspan_stats,
)
from clipscope.pipelines.models.open_clip_adapter import vit_spec_from_open_clip
from split_reference import randomized_affine

NOISE = 1e-7


def _low_rank_head(seed: int, k=600, d=96, rank=20, mean_scale=3.0) -> torch.Tensor:
    """Float32 rows of rank `rank` (plus a mean) in d dimensions, like a narrow head's contributions."""
    g = np.random.default_rng(seed)
    c = g.normal(size=(k, rank)) * np.geomspace(3.0, 0.05, rank) @ g.normal(size=(rank, d))
    return torch.from_numpy((c + mean_scale * g.normal(size=d)).astype(np.float32))


def _texts(seed: int, m: int, d: int) -> torch.Tensor:
    r = np.random.default_rng(seed).normal(size=(m, d))
    return torch.from_numpy(r / np.linalg.norm(r, axis=1, keepdims=True))


def _noisy(c: torch.Tensor, seed: int) -> torch.Tensor:
    """c plus noise of NOISE relative to the data (per entry, scaled by the data's largest magnitude)."""
    g = torch.Generator().manual_seed(seed)
    return c + NOISE * c.abs().max() * torch.randn(c.shape, generator=g, dtype=c.dtype)


def test_auto_is_the_numerical_rank_capped_at_80():
    c = _low_rank_head(0)
    stats = textspan_stats(c)
    assert numerical_rank(stats) == 21  # 20 directions of variation + the mean
    assert resolve_span_rank(stats, "auto") == 21
    assert resolve_span_rank(stats, 80) == 80  # an integer is used literally (capped by K and D only)
    assert resolve_span_rank(stats, 500) == 96
    wide = textspan_stats(torch.randn(400, 128, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    assert numerical_rank(wide) == 128 and resolve_span_rank(wide, "auto") == REFERENCE_SPAN_RANK
    res = textspan(c, _texts(1, 200, 96), basis_size=10)
    assert res.span_rank == 21
    with pytest.raises(ConfigError, match="span_rank must be 'auto' or an integer"):
        resolve_span_rank(stats, "full")
    with pytest.raises(ConfigError, match="rank_rtol"):
        numerical_rank(stats, rtol=0.0)
    with pytest.raises(ConfigError, match=r"basis_size must be an integer in \[1, min\(span rank 21"):
        textspan(c, _texts(1, 200, 96), basis_size=30)
    with pytest.raises(DataError, match="numerical rank 0"):
        textspan(torch.zeros(5, 8), _texts(1, 20, 8), basis_size=1)


def test_picks_are_stable_under_noise_with_auto_not_with_a_rank_past_the_noise_floor():
    texts = _texts(7, 400, 96)
    unstable = 0
    for seed in range(6):
        c = _low_rank_head(seed)
        noisy = _noisy(c, seed + 100)
        auto = textspan(c, texts, basis_size=15).indices
        auto_noisy = textspan(noisy, texts, basis_size=15).indices
        assert torch.equal(auto, auto_noisy), seed
        fixed = textspan(c, texts, basis_size=15, span_rank=REFERENCE_SPAN_RANK).indices
        fixed_noisy = textspan(noisy, texts, basis_size=15, span_rank=REFERENCE_SPAN_RANK).indices
        unstable += int(not torch.equal(fixed, fixed_noisy))
    # the reason for "auto": at r = 80 > rank 21 the picks follow the noise
    assert unstable >= 3


def test_tiny_model_heads_picks_are_stable_under_noise(model_cache):
    """Heads of a real (tiny) ViT: head width 16 in a 32-dim embedding, so each head's terms have
    numerical rank 19 (16 + ln_post offset and bias directions). A literal span rank between that
    and D = 32 plays the part of r = 80 on a ViT-B head (rank ≤ 66 < 80 < 512): it projects on
    singular directions chosen by float noise, and all picks then follow the noise; "auto" does not."""
    model = randomized_affine(model_cache("clipscope-tiny").model, seed=3, scale=0.2)
    spec = vit_spec_from_open_clip(model.visual).to(dtype=torch.float32)
    images = torch.randn(256, 3, *spec.image_size, generator=torch.Generator().manual_seed(4))
    out = decompose(spec, images, DecomposeRequest())
    heads = out.direct.heads / out.image_embedding.norm(dim=-1)[:, None, None, None]  # TextSpan's normalize
    texts = _texts(9, 300, spec.embed_dim)
    stable = {"auto": 0, "past the rank": 0}
    n_heads = 0
    for layer in range(spec.n_layers):
        for head in range(spec.n_heads):
            c = heads[:, layer, head]
            noisy = _noisy(c, 1000 * layer + head)
            rank = resolve_span_rank(textspan_stats(c), "auto")
            assert rank < spec.embed_dim  # a head's terms have rank ≤ head width + a few offsets
            assert resolve_span_rank(textspan_stats(noisy), "auto") == rank
            for key, span_rank in (("auto", "auto"), ("past the rank", rank + 5)):
                a = textspan(c, texts, basis_size=rank, span_rank=span_rank).indices
                b = textspan(noisy, texts, basis_size=rank, span_rank=span_rank).indices
                stable[key] += int(torch.equal(a, b))
            n_heads += 1
    assert stable["auto"] == n_heads, stable
    assert stable["past the rank"] <= n_heads // 2, stable
