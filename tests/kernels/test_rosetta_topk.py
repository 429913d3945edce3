"""Streamed top-K lists and best buddies from them against the kernel on the full matrix (ties included);
blocked accumulation bytes independent of the tile width; the reference score and the image scores."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from clipscope.kernels.rosetta import best_buddies, empty_pair_stats, pair_stats_update, pearson
from clipscope.kernels.rosetta_topk import (
    buddies_from_topk,
    empty_topk,
    merge_topk,
    pair_image_scores,
    reference_batch_score,
    tile_topk,
)


def _streamed_lists(corr: torch.Tensor, k: int, tile: int):
    rows, cols = empty_topk(corr.shape[0], k), empty_topk(corr.shape[1], k)
    for a in range(0, corr.shape[0], tile):
        for b in range(0, corr.shape[1], tile):
            block = corr[a:a + tile, b:b + tile]
            ra = torch.arange(a, min(a + tile, corr.shape[0]))
            rb = torch.arange(b, min(b + tile, corr.shape[1]))
            part = tile_topk(block, rb, k)
            merged = merge_topk(rows[0][ra], rows[1][ra], *part, k)
            rows[0][ra], rows[1][ra] = merged
            part = tile_topk(block.T, ra, k)
            merged = merge_topk(cols[0][rb], cols[1][rb], *part, k)
            cols[0][rb], cols[1][rb] = merged
    return rows, cols


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 9), st.integers(2, 9), st.integers(1, 4), st.integers(1, 5), st.integers(0, 10_000))
def test_buddies_from_streamed_lists_equal_the_kernel_with_ties(n1, n2, k, tile, seed):
    g = np.random.default_rng(seed)
    corr = torch.from_numpy(g.integers(-3, 4, size=(n1, n2)).astype(np.float64) / 3)  # many ties
    k = min(k, n1, n2)
    rows, cols = _streamed_lists(corr, k + 2, tile)  # lists longer than K, as the job keeps them
    pairs = buddies_from_topk(rows[1], cols[1], k, "symmetric")
    np.testing.assert_array_equal(pairs.numpy(), best_buddies(corr, k).numpy())
    # the lists are each row's top entries in the kernel's order (larger first, ties → lower index)
    for i in range(n1):
        order = sorted(range(n2), key=lambda j: (-float(corr[i, j]), j))[:k + 2]
        assert rows[1][i, :len(order)].tolist() == order
    reference = buddies_from_topk(rows[1], cols[1], k, "reference")
    for i, j in reference.tolist():
        assert j == rows[1][i, 0] and i in cols[1][j, :k].tolist()


def test_blocked_accumulation_bytes_do_not_depend_on_the_tile_width():
    g = np.random.default_rng(0)
    x = torch.from_numpy(g.normal(size=(7, 10, 5, 5)))
    y = torch.from_numpy(g.normal(size=(7, 6, 10, 10)))
    full = pair_stats_update(empty_pair_stats(x.mean((0, 2, 3)), y.mean((0, 2, 3))), x, y, unit_block=4)
    corr = pearson(full)
    for a0, a1, b0, b1 in ((0, 3, 0, 2), (3, 10, 2, 6), (5, 6, 1, 5)):
        part = pair_stats_update(empty_pair_stats(x[:, a0:a1].mean((0, 2, 3)), y[:, b0:b1].mean((0, 2, 3))),
                                 x[:, a0:a1], y[:, b0:b1], unit_block=4)
        assert pearson(part).numpy().tobytes() == corr[a0:a1, b0:b1].numpy().tobytes()
    plain = pearson(pair_stats_update(empty_pair_stats(x.mean((0, 2, 3)), y.mean((0, 2, 3))), x, y))
    torch.testing.assert_close(plain, corr, rtol=0, atol=1e-12)
    fp32 = pearson(pair_stats_update(empty_pair_stats(x.mean((0, 2, 3)), y.mean((0, 2, 3))), x, y,
                                     unit_block=4, matmul_dtype=torch.float32))
    assert (fp32 - corr).abs().max() < 1e-5


def test_reference_batch_score_is_a_cosine_of_standardised_resized_maps():
    g = np.random.default_rng(1)
    x = torch.from_numpy(g.normal(size=(4, 2, 3, 3)))
    y = torch.from_numpy(g.normal(size=(4, 3, 6, 6)))
    mx, sx, my, sy = torch.zeros(2), torch.ones(2), torch.zeros(3), torch.ones(3)
    score = reference_batch_score(x, y, mx, sx, my, sy)
    gx = F.interpolate(x / (1 + 1e-5), size=(6, 6), mode="bilinear", align_corners=False)
    dy = y / (1 + 1e-5)
    for a in range(2):
        for b in range(3):
            expected = (gx[:, a] * dy[:, b]).sum() / torch.sqrt((gx[:, a] ** 2).sum() * (dy[:, b] ** 2).sum())
            assert abs(float(score[a, b] - expected)) < 1e-12


def test_pair_image_scores_are_mean_products_of_standardised_maps():
    g = np.random.default_rng(2)
    x = torch.from_numpy(g.normal(size=(3, 2, 4, 4)) * 2 + 5)
    y = torch.from_numpy(g.normal(size=(3, 2, 2, 2)))
    mean_x, std_x = torch.tensor([5.0, 5.0]), torch.tensor([2.0, 0.0])  # the second pair has a dead unit
    mean_y, std_y = torch.zeros(2), torch.ones(2)
    scores = pair_image_scores(x, y, mean_x, std_x, mean_y, std_y)
    up = F.interpolate(y, size=(4, 4), mode="bilinear", align_corners=False)
    expected = (((x[:, 0] - 5) / 2) * up[:, 0]).mean(dim=(1, 2))
    torch.testing.assert_close(scores[:, 0], expected, rtol=0, atol=1e-12)
    assert torch.all(scores[:, 1] == 0)
