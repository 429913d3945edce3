"""Mean-ablation kernels against explicit loops and the defining identities."""

import pytest
import torch

from clipscope.errors import ConfigError
from clipscope.kernels.ablation import ablation_delta, masked_head_delta, mean_ablate


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_ablating_every_component_of_an_exact_sum_gives_the_mean_embedding():
    mlps, heads, rest = randn(9, 3, 5, seed=1), randn(9, 3, 2, 5, seed=2), randn(9, 5, seed=3)
    emb = mlps.sum(1) + heads.sum((1, 2)) + rest
    ablated = mean_ablate(mean_ablate(mean_ablate(emb, mlps, mlps.mean(0)), heads, heads.mean(0)),
                          rest[:, None], rest.mean(0)[None])
    torch.testing.assert_close(ablated, emb.mean(0).expand_as(emb), rtol=0, atol=1e-12)


def test_delta_is_the_sum_of_centred_components():
    terms, means = randn(4, 3, 2, 6, seed=4), randn(3, 2, 6, seed=5)
    expected = torch.zeros(4, 6, dtype=torch.float64)
    for i in range(3):
        for j in range(2):
            expected += terms[:, i, j] - means[i, j]
    torch.testing.assert_close(ablation_delta(terms, means), expected, rtol=0, atol=1e-12)
    # a single component without a component axis
    torch.testing.assert_close(ablation_delta(terms[:, 0, 0], means[0, 0]), terms[:, 0, 0] - means[0, 0])
    with pytest.raises(ConfigError, match=r"component terms \(4, 3, 2, 6\) and their means \(3, 6\) do not match"):
        ablation_delta(terms, means[:, 0])


def test_masked_head_delta_equals_a_loop_for_a_stack_of_masks():
    heads = randn(5, 3, 4, 6, seed=6)
    masks = torch.rand(7, 3, 4, generator=torch.Generator().manual_seed(7)) < 0.4
    got = masked_head_delta(heads, masks)
    assert got.shape == (7, 5, 6)
    for a in range(7):
        expected = torch.zeros(5, 6, dtype=torch.float64)
        for l, h in masks[a].nonzero().tolist():
            expected += heads[:, l, h]
        torch.testing.assert_close(got[a], expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(masked_head_delta(heads, masks[a]), expected, rtol=0, atol=1e-12)
