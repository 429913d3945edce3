"""The Rosetta job's units of work: passes over row blocks and correlation tiles, run on the executor.

Everything here runs unchanged in this process or on a Ray worker (arguments are plain data: store
URLs, unit ids, shifts). A tile computes with one torch thread, so its bytes are the same in-process, on
an embedded Ray and on a cluster; every sum runs in a fixed order (row blocks ascending, fixed-shape
unit blocks inside a tile), so the tile size and the worker count do not change a single bit.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from clipscope.cluster.reduce import map_reduce_local
from clipscope.kernels.rosetta import PairStats, empty_pair_stats, merge_pair_stats, pair_stats_update, pearson
from clipscope.kernels.rosetta_topk import pair_image_scores, reference_batch_score, reference_moments
from clipscope.pipelines.jobs.rosetta.sources import Source
from clipscope.storage.store import RunStore


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=16)
def _store(url: str) -> RunStore:
    return RunStore.open(url, "r")


def forget_stores() -> None:
    _store.cache_clear()


def load_units(source: Source, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[len(rows), len(ids), h, w] float64 maps of units `ids` (all of one native size) on `rows`."""
    offsets = source.offsets()
    layer_of = np.searchsorted(np.asarray(offsets), ids, side="right") - 1
    parts = []
    for layer_index in dict.fromkeys(layer_of.tolist()):  # layers in the order the ids meet them
        layer = source.layers[layer_index]
        pick = ids[layer_of == layer_index] - offsets[layer_index]
        order = np.argsort(pick, kind="stable")
        values = source.read(_store(source.url), layer, rows, pick[order])
        parts.append((layer_index, values[:, np.argsort(order, kind="stable")].astype(np.float64)))
    if len(parts) == 1:
        return parts[0][1]
    out = np.empty((len(rows), len(ids), *source.layers[layer_of[0]].size), np.float64)
    for layer_index, values in parts:
        out[:, layer_of == layer_index] = values
    return out


# --- pass A: per-unit moments of the native maps ----------------------------------------------------


def moments_block(sources: list[Source], rows: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per model (count, mean, M2) per unit over these rows' images × positions (float64)."""
    out = []
    for source in sources:
        counts, means, m2s = [], [], []
        for layer in source.layers:
            values = source.read(_store(source.url), layer, rows).astype(np.float64)
            flat = values.transpose(1, 0, 2, 3).reshape(layer.channels, -1)
            mean = flat.mean(axis=1) if flat.shape[1] else np.zeros(layer.channels)
            counts.append(np.full(layer.channels, flat.shape[1], np.float64))
            means.append(mean)
            m2s.append(((flat - mean[:, None]) ** 2).sum(axis=1))
        out.append((np.concatenate(counts), np.concatenate(means), np.concatenate(m2s)))
    return out


def merge_moments(a, b):
    """Chan et al.'s exact merge of (count, mean, M2), per model."""
    out = []
    for (na, ma, qa), (nb, mb, qb) in zip(a, b):
        n = na + nb
        safe = np.where(n > 0, n, 1.0)
        delta = mb - ma
        out.append((n, ma + delta * nb / safe, qa + qb + delta * delta * na * nb / safe))
    return out


def reference_moments_batch(sources: list[Source], rows: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The official code's pass 1 for one batch: per model (batch mean, unbiased batch variance) per unit."""
    out = []
    for source in sources:
        means, variances = [], []
        for layer in source.layers:
            values = torch.from_numpy(source.read(_store(source.url), layer, rows).astype(np.float64))
            m, v = reference_moments(values)
            means.append(m.numpy())
            variances.append(v.numpy())
        out.append((np.concatenate(means), np.concatenate(variances)))
    return out


# --- pass B: one correlation tile ----------------------------------------------------------------------


@dataclass(frozen=True)
class Tile:
    """Units `a_ids` of the anchor × units `b_ids` of model `model` (0: the anchor itself), one size each."""

    index: int
    model: int
    group: int
    a_ids: np.ndarray
    b_ids: np.ndarray

    def describe(self) -> dict:
        return {"model": self.model, "group": self.group, "a": [int(self.a_ids[0]), int(self.a_ids[-1])],
                "b": [int(self.b_ids[0]), int(self.b_ids[-1])]}


@dataclass(frozen=True)
class TileWork:
    """What a tile task needs besides the tile: the sources, the shifts/moments, the row blocks."""

    anchor: Source
    models: tuple[Source, ...]  # index 0: the anchor itself (self tiles)
    shifts: tuple[np.ndarray, ...]  # per model (anchor first): pass-A native means
    stds: tuple[np.ndarray, ...]
    blocks: tuple[np.ndarray, ...]  # valid rows per block (pearson) or per batch (reference)
    score: str
    unit_block: int
    matmul_dtype: str
    device: str


# Row-block partials of a tile join in this fixed tree (`cluster.reduce`): the same in one task
# (`map_reduce_local`) and over the executor (`--split-rows`), so both give the same bytes.
FANIN = 4


def tile_block_stats(work: TileWork, tile: Tile, rows: np.ndarray) -> PairStats:
    """The tile's sums over one row block (shifts: the pass-A means, shared by every block)."""
    device = torch.device(work.device)
    dtype = torch.float64 if work.matmul_dtype == "float64" else torch.float32
    with one_thread():
        stats = empty_pair_stats(torch.from_numpy(work.shifts[0][tile.a_ids]).to(device),
                                 torch.from_numpy(work.shifts[tile.model][tile.b_ids]).to(device))
        x = torch.from_numpy(load_units(work.anchor, tile.a_ids, rows)).to(device)
        y = torch.from_numpy(load_units(work.models[tile.model], tile.b_ids, rows)).to(device)
        return pair_stats_update(stats, x, y, unit_block=work.unit_block, matmul_dtype=dtype)


def tile_pearson(stats: PairStats) -> np.ndarray:
    with one_thread():
        return pearson(stats).cpu().numpy()


def tile_correlation(work: TileWork, tile: Tile) -> np.ndarray:
    """[len(a_ids), len(b_ids)] float64: Pearson r (or the reference score) of the tile, in this task."""
    if work.score == "pearson":
        return tile_pearson(map_reduce_local(work.blocks, functools.partial(tile_block_stats, work, tile),
                                             merge_pair_stats, fanin=FANIN))
    other = work.models[tile.model]
    xs, ys = work.shifts[0][tile.a_ids], work.shifts[tile.model][tile.b_ids]
    xd, yd = work.stds[0][tile.a_ids], work.stds[tile.model][tile.b_ids]
    total = np.zeros((len(tile.a_ids), len(tile.b_ids)))
    with one_thread():
        for rows in work.blocks:
            x = torch.from_numpy(load_units(work.anchor, tile.a_ids, rows))
            y = torch.from_numpy(load_units(other, tile.b_ids, rows))
            total += reference_batch_score(x, y, torch.from_numpy(xs), torch.from_numpy(xd),
                                           torch.from_numpy(ys), torch.from_numpy(yd)).numpy()
    return total / len(work.blocks)


def tile_task(work: TileWork, tile: Tile) -> np.ndarray:
    return tile_correlation(work, tile)


# --- pass C: dictionary scores --------------------------------------------------------------------------


@dataclass(frozen=True)
class PairGroup:
    """Buddy pairs of one model whose anchor maps share one size and whose model maps share one size."""

    model: int
    a_ids: np.ndarray
    b_ids: np.ndarray
    concept: np.ndarray


def dictionary_block(work: TileWork, groups: tuple[PairGroup, ...], n_concepts: int, rows: np.ndarray) -> np.ndarray:
    """[len(rows), concept]: per image, the sum over each concept's pairs of mean_x ĝ·d̂."""
    sums = np.zeros((len(rows), n_concepts))
    with one_thread():
        for group in groups:
            other = work.models[group.model]
            ua, ia = np.unique(group.a_ids, return_inverse=True)
            ub, ib = np.unique(group.b_ids, return_inverse=True)
            x = torch.from_numpy(load_units(work.anchor, ua, rows))[:, ia]
            y = torch.from_numpy(load_units(other, ub, rows))[:, ib]
            scores = pair_image_scores(
                x, y, torch.from_numpy(work.shifts[0][group.a_ids]), torch.from_numpy(work.stds[0][group.a_ids]),
                torch.from_numpy(work.shifts[group.model][group.b_ids]),
                torch.from_numpy(work.stds[group.model][group.b_ids])).numpy()
            for p, concept in enumerate(group.concept.tolist()):  # a fixed order of additions
                sums[:, concept] += scores[:, p]
    return sums
