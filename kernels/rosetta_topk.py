"""Rosetta at scale: streamed top-K lists, best buddies from them, the reference score, image scores.

The full correlation matrix of two models (or of a model with itself) is never held: every tile of it
is reduced to the K_keep strongest partners of each of its rows (`tile_topk`), and the lists of the
tiles are merged (`merge_topk`). The order is total — larger correlation first, ties to the lower unit
index, the order `kernels.rosetta.knn_mask` uses — so a merge gives the same lists in any grouping and
any order, and the first K entries of a list of K_keep ≥ K are the row's top K.

Best buddies (Eq. 4.3) from the lists (`buddies_from_topk`): ``symmetric`` — (i, j) iff j is among
the K first of row i and i among the K first of column j (thesis; `kernels.rosetta.best_buddies`);
``reference`` — the official code's rule: j = the first of row i, kept iff i is among the K first of
column j (so every row unit has at most one buddy).

The reference score (`reference_*`) is the official code's per-batch score: units standardised with
pooled per-batch moments, (a − μ)/(σ + 1e-5) at native size, bilinearly resized to the larger size,
cosine over the batch's images × positions, NaN → 0, averaged over batches. It is not a Pearson
coefficient (see docs/methods.md); it is here for comparison.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from clipscope.errors import ConfigError

RULES = ("symmetric", "reference")
REFERENCE_EPS = 1e-5


def _check_k(k: int, name: str = "k") -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"{name} must be an integer ≥ 1, got {k!r}")


def _order(values: Tensor, index: Tensor) -> Tensor:
    """Positions sorting each row by value descending, ties (and padding) by index ascending."""
    # index −1 (padding) carries −inf, so it sorts after every real entry.
    by_index = torch.sort(torch.where(index < 0, torch.iinfo(torch.int64).max, index), dim=1, stable=True).indices
    by_value = torch.sort(torch.gather(values, 1, by_index), dim=1, descending=True, stable=True).indices
    return torch.gather(by_index, 1, by_value)


def tile_topk(
    corr: Float[Tensor, "row col"], col_index: Int[Tensor, "col"], k: int
) -> tuple[Float[Tensor, "row k"], Int[Tensor, "row k"]]:
    """The k largest entries of each row with their column ids (`col_index`), padded by (−inf, −1)."""
    _check_k(k)
    if corr.ndim != 2 or col_index.shape != (corr.shape[1],):
        raise ConfigError(f"corr must be [row, col] with one column id per column, got {tuple(corr.shape)} "
                          f"and {tuple(col_index.shape)}")
    values = corr.to(torch.float64)
    index = col_index.to(torch.int64).expand(corr.shape[0], -1)
    return _select(values, index, k)


def _select(values: Tensor, index: Tensor, k: int) -> tuple[Tensor, Tensor]:
    order = _order(values, index)[:, :k]
    v, i = torch.gather(values, 1, order), torch.gather(index, 1, order)
    if v.shape[1] < k:
        pad = k - v.shape[1]
        v = torch.cat([v, v.new_full((v.shape[0], pad), float("-inf"))], dim=1)
        i = torch.cat([i, i.new_full((i.shape[0], pad), -1)], dim=1)
    return v, torch.where(torch.isneginf(v), torch.full_like(i, -1), i)


def merge_topk(
    a_values: Float[Tensor, "row ka"], a_index: Int[Tensor, "row ka"],
    b_values: Float[Tensor, "row kb"], b_index: Int[Tensor, "row kb"], k: int,
) -> tuple[Float[Tensor, "row k"], Int[Tensor, "row k"]]:
    """The k first of the union of two lists per row (the lists hold disjoint column ids)."""
    _check_k(k)
    return _select(torch.cat([a_values, b_values], dim=1).to(torch.float64),
                   torch.cat([a_index, b_index], dim=1).to(torch.int64), k)


def empty_topk(rows: int, k: int) -> tuple[Float[Tensor, "row k"], Int[Tensor, "row k"]]:
    _check_k(k)
    return (torch.full((rows, k), float("-inf"), dtype=torch.float64), torch.full((rows, k), -1, dtype=torch.int64))


def buddies_from_topk(
    row_index: Int[Tensor, "row kk"], col_index: Int[Tensor, "col kk"], k: int, rule: str = "symmetric"
) -> Int[Tensor, "pair 2"]:
    """Best buddies (row unit, column unit) from the sorted top lists of both sides, sorted by row then column."""
    _check_k(k)
    if rule not in RULES:
        raise ConfigError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    if k > row_index.shape[1] or k > col_index.shape[1]:
        raise ConfigError(f"k={k} exceeds the kept list lengths {row_index.shape[1]} and {col_index.shape[1]}")
    forward = row_index[:, :k] if rule == "symmetric" else row_index[:, :1]
    rows = torch.arange(row_index.shape[0], dtype=torch.int64).unsqueeze(1).expand_as(forward)
    real = forward >= 0
    back = col_index[forward.clamp(min=0), :k]  # [row, kf, k]
    mutual = real & (back == rows.unsqueeze(2)).any(dim=2)
    pairs = torch.stack([rows[mutual], forward[mutual]], dim=1)
    if pairs.shape[0] == 0:
        return pairs.reshape(0, 2)
    order = torch.argsort(pairs[:, 0] * (int(pairs[:, 1].max()) + 1) + pairs[:, 1])
    return pairs[order]


def reference_moments(maps: Float[Tensor, "image unit h w"]) -> tuple[Float[Tensor, "unit"], Float[Tensor, "unit"]]:
    """One batch's per-unit mean and unbiased variance over images × positions (float64)."""
    if maps.ndim != 4:
        raise ConfigError(f"maps must be [image, unit, height, width], got shape {tuple(maps.shape)}")
    m = maps.to(torch.float64).permute(1, 0, 2, 3).reshape(maps.shape[1], -1)
    return m.mean(dim=1), m.var(dim=1, unbiased=True)


def _standardised(maps: Tensor, mean: Tensor, std: Tensor, size: tuple[int, int]) -> Tensor:
    z = (maps.to(torch.float64) - mean[None, :, None, None]) / (std[None, :, None, None] + REFERENCE_EPS)
    if tuple(z.shape[2:]) != size:
        z = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
    return z


def reference_batch_score(
    x: Float[Tensor, "image xunit h w"], y: Float[Tensor, "image yunit h2 w2"],
    x_mean: Float[Tensor, "xunit"], x_std: Float[Tensor, "xunit"],
    y_mean: Float[Tensor, "yunit"], y_std: Float[Tensor, "yunit"],
) -> Float[Tensor, "xunit yunit"]:
    """One batch's reference score: Σ g·d / √(Σg² Σd²) of the standardised, resized maps; NaN → 0."""
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"x and y must hold the same images, got {x.shape[0]} and {y.shape[0]}")
    size = (max(x.shape[2], y.shape[2]), max(x.shape[3], y.shape[3]))
    g = _standardised(x, x_mean, x_std, size).permute(1, 0, 2, 3).reshape(x.shape[1], -1)
    d = _standardised(y, y_mean, y_std, size).permute(1, 0, 2, 3).reshape(y.shape[1], -1)
    score = (g @ d.T) / torch.sqrt(torch.outer((g * g).sum(dim=1), (d * d).sum(dim=1)))
    return torch.nan_to_num(score, nan=0.0)


def pair_image_scores(
    x: Float[Tensor, "image pair h w"], y: Float[Tensor, "image pair h2 w2"],
    x_mean: Float[Tensor, "pair"], x_std: Float[Tensor, "pair"],
    y_mean: Float[Tensor, "pair"], y_std: Float[Tensor, "pair"],
) -> Float[Tensor, "image pair"]:
    """Per image and unit pair (channel p of x with channel p of y): mean over positions of ĝ·d̂, the
    maps standardised with the dataset's moments and resized to the larger size (the dictionary's score).
    A unit of zero std scores 0."""
    if x.shape[:2] != y.shape[:2]:
        raise ConfigError(f"x and y must be [image, pair, …] of the same images and pairs, got "
                          f"{tuple(x.shape)} and {tuple(y.shape)}")
    size = (max(x.shape[2], y.shape[2]), max(x.shape[3], y.shape[3]))
    safe_x = torch.where(x_std > 0, x_std, torch.ones_like(x_std))
    safe_y = torch.where(y_std > 0, y_std, torch.ones_like(y_std))
    g = (x.to(torch.float64) - x_mean[None, :, None, None]) / safe_x[None, :, None, None]
    d = (y.to(torch.float64) - y_mean[None, :, None, None]) / safe_y[None, :, None, None]
    if tuple(g.shape[2:]) != size:
        g = F.interpolate(g, size=size, mode="bilinear", align_corners=False)
    if tuple(d.shape[2:]) != size:
        d = F.interpolate(d, size=size, mode="bilinear", align_corners=False)
    live = ((x_std > 0) & (y_std > 0)).to(torch.float64)
    return (g * d).mean(dim=(2, 3)) * live[None, :]
