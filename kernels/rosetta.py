"""Rosetta Neurons (thesis ch. 4): exact global Pearson correlations, best buddies, merging, clusters.

Units are channels of activation maps. For a pair of units the maps are bilinearly resized to the
larger of the two spatial sizes (`interpolate(mode="bilinear", align_corners=False)`; only the
smaller map changes) and correlated over images × positions (Eq. 4.1–4.2). Eq. 4.2 as printed
divides the co-deviation sum by √(var·var) with the 1/(n·m² − 1) variances, i.e. it is n·m² − 1
times the Pearson coefficient; the factor is constant within one resolution group, and here the
Pearson coefficient itself is returned so that groups of different sizes are comparable. The
reference code averages per-batch correlations; this computes the exact global value.

Streaming: `PairStats` holds n, Σx, Σx², Σy, Σy², Σxyᵀ in float64 of *shifted* data (x − a,
y − c with fixed per-unit shifts, e.g. the first batch's means), so that maps with a large mean
and small variance do not lose their variance to cancellation. Stats merge in any order (a
different shift is rebased exactly). One `PairStats` covers one resolution group (all x maps of
one size, all y maps of one size) and one tile of units (`x_units`, `y_units` ranges), so a
large U1×U2 matrix is split across workers; `unit_tiles` cuts the ranges.

Matching (Eq. 4.3): (i, j) are best buddies with K if j is among the K units of model 2 most
correlated with i and i among the K units of model 1 most correlated with j (K = 1: mutual
argmax). Ties in a top-K go to the lower unit index. Merging across models (Eq. 4.4): tuples
(j, k_1, …, k_m) of an anchor unit j (the thesis's generator G) with a best buddy k_i in every
other model D_i. Clustering: two Rosetta tuples share a concept when their anchor units are self
best buddies, BB(G, G; K); the thesis leaves open what "same cluster" means beyond that pairwise
relation, so clusters are its connected components (tuples with the same anchor unit are in one
cluster). A unit is trivially its own nearest neighbour (r = 1), so the diagonal is excluded from
the self matching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from clipscope.errors import ConfigError

# Units whose variance about the mean is below this fraction of their second moment about the
# shift are constant up to rounding (e.g. dead ReLU units); their correlations are reported as 0.
CONSTANT_RELATIVE_VARIANCE = 1e-13


@dataclass(frozen=True)
class PairStats:
    """Co-moment sums of one tile (x units [x0, x1) of model 1, y units [y0, y1) of model 2)."""

    count: int
    x_shift: Float[Tensor, "xunit"]
    y_shift: Float[Tensor, "yunit"]
    x_sum: Float[Tensor, "xunit"]
    x_sq: Float[Tensor, "xunit"]
    y_sum: Float[Tensor, "yunit"]
    y_sq: Float[Tensor, "yunit"]
    xy: Float[Tensor, "xunit yunit"]
    x_units: tuple[int, int]
    y_units: tuple[int, int]

    def rebased(self, x_shift: Tensor, y_shift: Tensor) -> "PairStats":
        """The same sums relative to other shifts (exact algebra)."""
        dx = self.x_shift - x_shift.to(self.x_shift)
        dy = self.y_shift - y_shift.to(self.y_shift)
        n = self.count
        return PairStats(
            count=n,
            x_shift=x_shift.to(self.x_shift).clone(),
            y_shift=y_shift.to(self.y_shift).clone(),
            x_sum=self.x_sum + n * dx,
            x_sq=self.x_sq + 2 * dx * self.x_sum + n * dx * dx,
            y_sum=self.y_sum + n * dy,
            y_sq=self.y_sq + 2 * dy * self.y_sum + n * dy * dy,
            xy=self.xy + torch.outer(dx, self.y_sum) + torch.outer(self.x_sum, dy) + n * torch.outer(dx, dy),
            x_units=self.x_units,
            y_units=self.y_units,
        )


def unit_tiles(n_units: int, tile: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) ranges of at most `tile` units covering 0..n_units."""
    if not isinstance(tile, int) or tile < 1:
        raise ConfigError(f"tile must be an integer ≥ 1, got {tile!r}")
    return [(s, min(s + tile, n_units)) for s in range(0, n_units, tile)]


def _check_maps(name: str, maps: Tensor) -> None:
    if maps.ndim != 4:
        raise ConfigError(f"{name} must be [image, unit, height, width], got shape {tuple(maps.shape)}")


def _range(name: str, units: tuple[int, int] | None, n: int) -> tuple[int, int]:
    if units is None:
        return (0, n)
    a, b = units
    if not 0 <= a < b <= n:
        raise ConfigError(f"{name} must be a range within [0, {n}] with start < stop, got {units}")
    return (int(a), int(b))


def map_means(maps: Float[Tensor, "image unit height width"]) -> Float[Tensor, "unit"]:
    """Per-unit mean over images and positions in float64 (a good shift)."""
    _check_maps("maps", maps)
    return maps.to(torch.float64).mean(dim=(0, 2, 3))


def empty_pair_stats(
    x_shift: Float[Tensor, "xunit"],
    y_shift: Float[Tensor, "yunit"],
    *,
    x_units: tuple[int, int] | None = None,
    y_units: tuple[int, int] | None = None,
) -> PairStats:
    """Zero sums for a tile; the shifts (one per unit of the tile) are fixed from here on."""
    xs, ys = x_shift.to(torch.float64), y_shift.to(device=x_shift.device, dtype=torch.float64)
    u1, u2 = xs.shape[0], ys.shape[0]
    x_units = (0, u1) if x_units is None else x_units
    y_units = (0, u2) if y_units is None else y_units
    if x_units[1] - x_units[0] != u1 or y_units[1] - y_units[0] != u2:
        raise ConfigError(f"shifts of {u1} and {u2} units do not match unit ranges {x_units} and {y_units}")
    z1, z2 = torch.zeros_like(xs), torch.zeros_like(ys)
    xy = torch.zeros(u1, u2, dtype=torch.float64, device=xs.device)
    return PairStats(
        0, xs.clone(), ys.clone(), z1, z1.clone(), z2, z2.clone(), xy,
        (int(x_units[0]), int(x_units[1])), (int(y_units[0]), int(y_units[1])),
    )


def init_pair_stats(
    x: Float[Tensor, "image xunit h w"],
    y: Float[Tensor, "image yunit h2 w2"],
    *,
    x_units: tuple[int, int] | None = None,
    y_units: tuple[int, int] | None = None,
) -> PairStats:
    """Empty stats for a tile with shifts from this (first) batch's per-unit means."""
    _check_maps("x", x)
    _check_maps("y", y)
    x0, x1 = _range("x_units", x_units, x.shape[1])
    y0, y1 = _range("y_units", y_units, y.shape[1])
    return empty_pair_stats(map_means(x[:, x0:x1]), map_means(y[:, y0:y1]), x_units=(x0, x1), y_units=(y0, y1))


def _flatten(maps: Tensor, shift: Tensor, size: tuple[int, int]) -> Tensor:
    # Shift before resizing: bilinear weights sum to 1, so this equals shifting afterwards, and the
    # interpolation then works on small numbers.
    m = maps.to(torch.float64) - shift.to(maps.device)[None, :, None, None]
    if tuple(m.shape[2:]) != size:
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    return m.permute(0, 2, 3, 1).reshape(-1, m.shape[1])


def _blocks(maps: Tensor, shift: Tensor, size: tuple[int, int], block: int) -> list[Tensor]:
    """Flattened shifted maps in unit blocks of exactly `block` columns (the last one zero-padded)."""
    out = []
    for start in range(0, maps.shape[1], block):
        part = maps[:, start:start + block]
        part_shift = shift[start:start + block]
        pad = block - part.shape[1]
        if pad:
            part = torch.cat([part.to(torch.float64), part.new_zeros(part.shape[0], pad, *part.shape[2:],
                                                                      dtype=torch.float64)], dim=1)
            part_shift = torch.cat([part_shift, part_shift.new_zeros(pad)])
        out.append(_flatten(part, part_shift, size))
    return out


def _blocked_sums(blocks: list[Tensor], n_units: int) -> tuple[Tensor, Tensor]:
    sums = torch.cat([b.sum(dim=0) for b in blocks])[:n_units]
    squares = torch.cat([(b * b).sum(dim=0) for b in blocks])[:n_units]
    return sums, squares


def _blocked_cross(xb: list[Tensor], yb: list[Tensor], shape: tuple[int, int], matmul_dtype: torch.dtype) -> Tensor:
    rows = [torch.cat([(a.to(matmul_dtype).T @ b.to(matmul_dtype)).to(torch.float64) for b in yb], dim=1)
            for a in xb]
    return torch.cat(rows, dim=0)[: shape[0], : shape[1]]


def pair_stats_update(
    stats: PairStats,
    x: Float[Tensor, "image xunit h w"],
    y: Float[Tensor, "image yunit h2 w2"],
    *,
    unit_block: int | None = None,
    matmul_dtype: torch.dtype = torch.float64,
) -> PairStats:
    """Add a batch of maps of both models on the same images (channels sliced to the tile).

    `unit_block`: compute the sums and Σxyᵀ in blocks of exactly this many units (the last block
    zero-padded), so that every unit pair's float bytes are those of one fixed-shape product — the
    same whatever the tile's width (a BLAS kernel's summation order may depend on the matrix shape).
    `matmul_dtype`: the dtype of the Σxyᵀ product (float32 on GPUs: data are shifted by their means,
    each block's product is added into the float64 sums); the first and second moments stay float64.
    """
    _check_maps("x", x)
    _check_maps("y", y)
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"x and y must hold the same images, got {x.shape[0]} and {y.shape[0]}")
    (x0, x1), (y0, y1) = stats.x_units, stats.y_units
    if x.shape[1] < x1 or y.shape[1] < y1:
        raise ConfigError(f"maps have {x.shape[1]} and {y.shape[1]} units, the tile needs {x1} and {y1}")
    if unit_block is not None and (isinstance(unit_block, bool) or not isinstance(unit_block, int) or unit_block < 1):
        raise ConfigError(f"unit_block must be None or an integer ≥ 1, got {unit_block!r}")
    if matmul_dtype not in (torch.float64, torch.float32):
        raise ConfigError(f"matmul_dtype must be torch.float64 or torch.float32, got {matmul_dtype!r}")
    size = (max(x.shape[2], y.shape[2]), max(x.shape[3], y.shape[3]))
    if unit_block is None:
        xf = _flatten(x[:, x0:x1], stats.x_shift, size)
        yf = _flatten(y[:, y0:y1], stats.y_shift, size)
        n = xf.shape[0]
        x_sum, x_sq = xf.sum(dim=0), (xf * xf).sum(dim=0)
        y_sum, y_sq = yf.sum(dim=0), (yf * yf).sum(dim=0)
        xy = (xf.to(matmul_dtype).T @ yf.to(matmul_dtype)).to(torch.float64)
    else:
        xb = _blocks(x[:, x0:x1], stats.x_shift, size, unit_block)
        yb = _blocks(y[:, y0:y1], stats.y_shift, size, unit_block)
        n = xb[0].shape[0]
        x_sum, x_sq = _blocked_sums(xb, x1 - x0)
        y_sum, y_sq = _blocked_sums(yb, y1 - y0)
        xy = _blocked_cross(xb, yb, (x1 - x0, y1 - y0), matmul_dtype)
    return PairStats(
        count=stats.count + n,
        x_shift=stats.x_shift,
        y_shift=stats.y_shift,
        x_sum=stats.x_sum + x_sum,
        x_sq=stats.x_sq + x_sq,
        y_sum=stats.y_sum + y_sum,
        y_sq=stats.y_sq + y_sq,
        xy=stats.xy + xy,
        x_units=stats.x_units,
        y_units=stats.y_units,
    )


def merge_pair_stats(a: PairStats, b: PairStats) -> PairStats:
    """Sums over the union of two disjoint image sets of the same tile."""
    if a.x_units != b.x_units or a.y_units != b.y_units:
        raise ConfigError(f"cannot merge tiles {a.x_units}×{a.y_units} and {b.x_units}×{b.y_units}")
    if not (torch.equal(a.x_shift, b.x_shift) and torch.equal(a.y_shift, b.y_shift)):
        b = b.rebased(a.x_shift, a.y_shift)
    return PairStats(
        a.count + b.count, a.x_shift, a.y_shift,
        a.x_sum + b.x_sum, a.x_sq + b.x_sq, a.y_sum + b.y_sum, a.y_sq + b.y_sq, a.xy + b.xy,
        a.x_units, a.y_units,
    )


def pearson(stats: PairStats) -> Float[Tensor, "xunit yunit"]:
    """Pearson correlation of every unit pair of the tile; 0 where a unit is constant."""
    if stats.count < 2:
        raise ConfigError(f"pearson needs at least 2 samples, got count={stats.count}")
    n = stats.count
    var_x = stats.x_sq - stats.x_sum**2 / n
    var_y = stats.y_sq - stats.y_sum**2 / n
    cov = stats.xy - torch.outer(stats.x_sum, stats.y_sum) / n
    live_x = var_x > CONSTANT_RELATIVE_VARIANCE * stats.x_sq
    live_y = var_y > CONSTANT_RELATIVE_VARIANCE * stats.y_sq
    denom = torch.sqrt(torch.outer(var_x.clamp(min=0), var_y.clamp(min=0)))
    live = torch.outer(live_x, live_y)
    corr = torch.where(live, cov / torch.where(live, denom, torch.ones_like(denom)), torch.zeros_like(cov))
    return corr.clamp(-1.0, 1.0)


def knn_mask(scores: Float[Tensor, "row col"], k: int) -> Tensor:
    """Boolean [row, col]: the k highest-scoring columns of each row (ties → lower column)."""
    if not isinstance(k, int) or not 1 <= k <= scores.shape[1]:
        raise ConfigError(f"k must be an integer in [1, {scores.shape[1]}], got {k!r}")
    if bool(torch.isnan(scores).any()):
        raise ConfigError("scores contain NaN")
    kth = scores.topk(k, dim=1).values[:, -1:]
    greater = scores > kth
    equal = scores == kth
    room = k - greater.sum(dim=1, keepdim=True)
    return greater | (equal & (equal.cumsum(dim=1) <= room))


def best_buddies(corr: Float[Tensor, "xunit yunit"], k: int = 1) -> Int[Tensor, "pair 2"]:
    """Eq. 4.3: pairs (i, j) that are each among the other's k most correlated units.

    Returns [pair, 2] (unit of model 1, unit of model 2), sorted by i then j.
    """
    if corr.ndim != 2:
        raise ConfigError(f"corr must be [xunit, yunit], got shape {tuple(corr.shape)}")
    mutual = knn_mask(corr, k) & knn_mask(corr.T, k).T
    return torch.nonzero(mutual)


def self_best_buddies(corr: Float[Tensor, "unit unit2"], k: int = 1) -> Int[Tensor, "pair 2"]:
    """BB(G, G; K) of one model with itself, diagonal excluded; pairs (i, j) with i < j."""
    if corr.ndim != 2 or corr.shape[0] != corr.shape[1]:
        raise ConfigError(f"corr must be a square [unit, unit] matrix, got shape {tuple(corr.shape)}")
    sym = 0.5 * (corr + corr.T)
    sym = sym.masked_fill(torch.eye(sym.shape[0], dtype=torch.bool, device=sym.device), float("-inf"))
    pairs = best_buddies(sym, k)
    return pairs[pairs[:, 0] < pairs[:, 1]]


def rosetta_units(pairs_per_model: list[Int[Tensor, "pair 2"]]) -> Int[Tensor, "tuple model"]:
    """Eq. 4.4: tuples (j, k_1, …, k_m) with (j, k_i) ∈ BB(anchor, model i) for every i.

    Column 0 is the anchor unit; with several buddies per model every combination is a tuple.
    Rows are sorted lexicographically.
    """
    if not pairs_per_model:
        raise ConfigError("pairs_per_model must hold the best buddies of at least one model")
    partners: list[dict[int, list[int]]] = []
    for pairs in pairs_per_model:
        if pairs.ndim != 2 or pairs.shape[1] != 2:
            raise ConfigError(f"each pairs tensor must be [pair, 2], got shape {tuple(pairs.shape)}")
        table: dict[int, list[int]] = {}
        for i, j in pairs.tolist():
            table.setdefault(i, []).append(j)
        partners.append({i: sorted(js) for i, js in table.items()})
    anchors = sorted(set.intersection(*(set(t) for t in partners)))
    out: list[list[int]] = []
    for a in anchors:
        combos: list[list[int]] = [[a]]
        for table in partners:
            combos = [c + [j] for c in combos for j in table[a]]
        out.extend(combos)
    device = pairs_per_model[0].device
    if not out:
        return torch.empty(0, 1 + len(pairs_per_model), dtype=torch.long, device=device)
    return torch.tensor(out, dtype=torch.long, device=device)


def cluster_units(
    tuples: Int[Tensor, "tuple model"], self_pairs: Int[Tensor, "pair 2"]
) -> Int[Tensor, "tuple"]:
    """Concept id per Rosetta tuple: connected components of "anchors are self best buddies".

    Ids are 0, 1, … in order of each cluster's first tuple.
    """
    anchors = tuples[:, 0].tolist() if tuples.numel() else []
    parent: dict[int, int] = {a: a for a in anchors}

    def find(u: int) -> int:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    for i, j in self_pairs.tolist():
        if i in parent and j in parent:
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    ids: dict[int, int] = {}
    labels = [ids.setdefault(find(a), len(ids)) for a in anchors]
    return torch.tensor(labels, dtype=torch.long, device=tuples.device)
