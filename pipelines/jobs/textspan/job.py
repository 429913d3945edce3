"""TextSpan for every head of chosen layers, from statistics streamed out of a store.

Text embeddings of a pool are computed once with the run's model and cached in the store under
`text_embeddings/<key>/embeddings` (key = hash of the pool's texts and the model identity). Each head's greedy
search is independent and K-independent in cost, so heads are spread as Ray tasks when Ray runs.
Results land under `reductions/textspan/layer_{l}/…` and as a long table (one row per pick).

Span rank: `--span-rank auto` (the default) projects each head's texts on min(80, the numerical rank of
the head's statistics) singular directions, so that no direction is float noise (a ViT-B head has rank
≤ 66 < 80); one warning line says when that is below the reference code's 80. An integer is used
literally (`--span-rank 80` reproduces the reference code).

The heads' statistics (K, ΣC, ΣCᵀC) come from the stored reduction `reductions/head_statistics/…`
(`statistics.stored_head_statistics`): streamed out of the rows and stored on the first run, read back by
every later one (another pool, m or span rank), updated from the new shards' rows when the store grew.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from clipscope.cluster.executor import Executor, LocalExecutor
from clipscope.kernels.textspan import (
    DEFAULT_RANK_RTOL,
    REFERENCE_SPAN_RANK,
    TextSpanStats,
    resolve_span_rank,
    textspan_from_stats,
)
from clipscope.pipelines.models.loading import LoadedModel
from clipscope.pipelines.texts.embedding_cache import cached_text_embeddings
from clipscope.pipelines.jobs.textspan.result import ARRAYS, Result, layer_group, read_layer, resolve
from clipscope.pipelines.jobs.textspan.settings import TextSpanSettings
from clipscope.pipelines.jobs.textspan.statistics import stored_head_statistics
from clipscope.storage import schema
from clipscope.storage.results import begin_reduction
from clipscope.storage.store import RunStore

log = logging.getLogger(__name__)


def rank_rtol_for(dtype: np.dtype) -> float:
    """Tolerance of the numerical rank for head terms stored in `dtype`: 1e-5 for float32/64, 10 ulp of
    a coarser dtype (float16 rounding alone spreads noise singular values up to ~1e-4 of the largest)."""
    return max(DEFAULT_RANK_RTOL, 10 * float(np.finfo(dtype).eps))


@dataclass(frozen=True)
class _HeadSearch:
    """Picklable per-head task: the greedy search on one head's statistics."""

    texts: np.ndarray
    basis_size: int
    span_rank: int | str
    rank_rtol: float

    def __call__(self, stats: TextSpanStats) -> dict[str, np.ndarray]:
        # r: "auto" → min(80, numerical rank); an integer literally; both capped by K and D
        rank = resolve_span_rank(stats, self.span_rank, self.rank_rtol)
        # m cannot exceed the span the texts are projected on nor the pool itself
        usable = min(self.basis_size, self.texts.shape[0], rank)
        result = textspan_from_stats(stats, torch.from_numpy(self.texts).double(), basis_size=usable, span_rank=rank)
        return {"indices": result.indices.numpy(), "variances": result.variances.numpy(),
                "explained_ratio": result.explained_ratio.numpy(),
                "total_variance": np.float64(result.total_variance), "span_rank": rank}


def run(store: RunStore, settings: TextSpanSettings, executor: Executor | None = None, *,
        loaded: LoadedModel | None = None) -> Result:
    """TextSpan for every head of the settings' layers; writes the results into the store, returns them.

    Each layer's group is written whole (storage.results); a layer whose group was written with the
    same settings and texts from the same extraction is read back, not recomputed (unless `force`).
    `loaded` is the run's model, to encode texts not cached in the store (None: loaded when needed).
    """
    layers, texts, pool, texts_key = resolve(store, settings)
    rtol = settings.rank_rtol
    if settings.span_rank == "auto" and schema.DIRECT_HEADS.path() in store.array_names():
        # float16 head terms carry more rounding noise than the default tolerance assumes
        rtol = max(rtol, rank_rtol_for(store.array(schema.DIRECT_HEADS.path()).dtype))
    record = {"basis_size": settings.basis_size, "span_rank": settings.span_rank, "normalize": settings.normalize,
              "rank_rtol": rtol, "pool": pool, "n_texts": len(texts), "texts_key": texts_key}
    with begin_reduction(store, "textspan", record, allow_incomplete=settings.allow_incomplete,
                         force=settings.force) as reduction:
        todo = tuple(layer for layer in layers if not reduction.is_current(layer_group(layer)))
        per_layer = {layer: read_layer(store, layer, texts_key) for layer in layers if layer not in todo}
        if todo:
            embeddings = cached_text_embeddings(store, texts, pool_name=pool, loaded=loaded)
            searched = _search_layers(store, todo, embeddings, settings, rtol, executor)
            fresh = Result.of_layers(settings, todo, texts, pool, texts_key, searched)
            if store.mode == "r+":
                fresh.write(reduction)
            per_layer.update(searched)
    return Result.of_layers(settings, layers, texts, pool, texts_key, per_layer)


def _search_layers(store: RunStore, layers: Sequence[int], embeddings: np.ndarray, settings: TextSpanSettings,
                   rank_rtol: float, executor: Executor | None) -> dict[int, dict[str, np.ndarray]]:
    """The greedy search for every head of `layers`: per layer, the stacked picks of its heads."""
    executor = executor if executor is not None else LocalExecutor()
    stats = stored_head_statistics(store, layers, normalize=settings.normalize, executor=executor,
                                   allow_incomplete=settings.allow_incomplete, force=settings.force)
    flat = [s for per_layer in stats for s in per_layer]
    search = _HeadSearch(embeddings, settings.basis_size, settings.span_rank, rank_rtol)
    results = executor.fan_out(search, flat, desc="textspan search", unit="heads")
    n_heads = len(stats[0])
    if settings.span_rank == "auto":
        _notice_capped_ranks(layers, [r["span_rank"] for r in results])
    out = {}
    for i, layer in enumerate(layers):
        per_head = results[i * n_heads:(i + 1) * n_heads]
        out[layer] = {k: np.stack([r[k] for r in per_head]) for k in ARRAYS}
        out[layer]["span_ranks_used"] = np.array([int(r["span_rank"]) for r in per_head], np.int64)
    return out


def _notice_capped_ranks(layers: Sequence[int], ranks: Sequence[int]) -> None:
    """One warning line when "auto" used fewer singular directions than the reference code's 80."""
    capped = [r for r in ranks if r < REFERENCE_SPAN_RANK]
    if not capped:
        return
    spread = f"{min(capped)}" if min(capped) == max(capped) else f"{min(capped)}–{max(capped)}"
    log.warning(
        "textspan: --span-rank auto used the heads' numerical rank (%s) instead of the reference code's %d on %d "
        "of %d heads of layers %s (directions past it are float noise); pass --span-rank %d to reproduce the "
        "reference code literally", spread, REFERENCE_SPAN_RANK, len(capped), len(ranks),
        ", ".join(str(l) for l in layers), REFERENCE_SPAN_RANK)
