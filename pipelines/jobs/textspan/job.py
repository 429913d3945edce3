"""TextSpan for every head of chosen layers, from statistics streamed out of a store.

Text embeddings of a pool are computed once with the run's model and cached in the store under
`text_embeddings/<key>/embeddings` (key = hash of the pool's texts and the model identity). Each head's greedy
search is independent and K-independent in cost, so heads are spread as Ray tasks when Ray runs.
Results land under `reductions/textspan/layer_{l}/…` and as a long table (one row per pick).

Span rank: `--span-rank auto` (the default) projects each head's texts on min(80, the numerical rank of
the head's statistics) singular directions, so that no direction is float noise (a ViT-B head has rank
≤ 66 < 80); one warning line says when that is below the reference code's 80. An integer is used
literally (`--span-rank 80` reproduces the reference code).
"""

from __future__ import annotations

import logging
import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np
import pyarrow as pa
import torch

from clipscope.cluster.executor import Executor, LocalExecutor
from clipscope.errors import ParameterError
from clipscope.params import Boolean, Interval, Options, Validated
from clipscope.kernels.textspan import (
    DEFAULT_RANK_RTOL,
    DEFAULT_SPAN_RANK,
    REFERENCE_SPAN_RANK,
    TextSpanStats,
    resolve_span_rank,
    textspan_from_stats,
)
from clipscope.pipelines.models.loading import LoadedModel
from clipscope.pipelines.texts.embedding_cache import cached_text_embeddings, embeddings_key
from clipscope.pipelines.jobs.means.job import head_statistics
from clipscope.storage import schema
from clipscope.storage.results import Reduction, begin_reduction
from clipscope.storage.store import RunStore

RESULT_PREFIX = "reductions/textspan"
log = logging.getLogger(__name__)


def parse_span_rank(value: str | int) -> str | int:
    """`--span-rank`: "auto" or an integer ≥ 1 (used literally)."""
    if value == "auto":
        return value
    try:
        rank = int(value)
    except (TypeError, ValueError):
        raise ParameterError("span_rank", f"must be 'auto' or an integer ≥ 1, got {value!r}") from None
    if isinstance(value, bool) or rank < 1 or str(rank) != str(value).strip():
        raise ParameterError("span_rank", f"must be 'auto' or an integer ≥ 1, got {value!r}")
    return rank


def rank_rtol_for(dtype: np.dtype) -> float:
    """Tolerance of the numerical rank for head terms stored in `dtype`: 1e-5 for float32/64, 10 ulp of
    a coarser dtype (float16 rounding alone spreads noise singular values up to ~1e-4 of the largest)."""
    return max(DEFAULT_RANK_RTOL, 10 * float(np.finfo(dtype).eps))


@dataclass(frozen=True)
class TextSpanSettings(Validated):
    basis_size: int = 10
    span_rank: int | str = DEFAULT_SPAN_RANK
    normalize: bool = True
    rank_rtol: float = DEFAULT_RANK_RTOL

    parameter_constraints: ClassVar = {
        "basis_size": [Interval(int, 1)],
        "span_rank": [Options("auto"), Interval(int, 1)],
        "normalize": [Boolean()],
        "rank_rtol": [Interval(float, 0, 1, closed="neither")],
    }


@dataclass(frozen=True)
class _HeadSearch:
    """Picklable per-head task: the greedy search on one head's statistics."""

    texts: np.ndarray
    settings: TextSpanSettings

    def __call__(self, stats: TextSpanStats) -> dict[str, np.ndarray]:
        # r: "auto" → min(80, numerical rank); an integer literally; both capped by K and D
        rank = resolve_span_rank(stats, self.settings.span_rank, self.settings.rank_rtol)
        # m cannot exceed the span the texts are projected on nor the pool itself
        usable = min(self.settings.basis_size, self.texts.shape[0], rank)
        result = textspan_from_stats(stats, torch.from_numpy(self.texts).double(), basis_size=usable, span_rank=rank)
        return {"indices": result.indices.numpy(), "variances": result.variances.numpy(),
                "explained_ratio": result.explained_ratio.numpy(),
                "total_variance": np.float64(result.total_variance), "span_rank": rank}


def layer_group(layer: int) -> str:
    return schema.TEXTSPAN.path(layer=layer)


def run_textspan(store: RunStore, layers: Sequence[int], texts: Sequence[str], *,
                 settings: TextSpanSettings = TextSpanSettings(), pool_name: str = "custom",
                 executor: Executor | None = None, loaded: LoadedModel | None = None, allow_incomplete: bool = False,
                 force: bool = False) -> pa.Table:
    """TextSpan for every head of `layers`; writes the results into the store, returns the table.

    Each layer's group is written whole (storage.results); a layer whose group was written with the
    same settings and texts from the same extraction is read back, not recomputed (unless `force`).
    """
    if settings.span_rank == "auto" and schema.DIRECT_HEADS.path() in store.array_names():
        # float16 head terms carry more rounding noise than the default tolerance assumes
        rtol = max(settings.rank_rtol, rank_rtol_for(store.array(schema.DIRECT_HEADS.path()).dtype))
        settings = dataclasses.replace(settings, rank_rtol=rtol)
    texts_key = embeddings_key(texts, store.info.model.to_dict())
    record = {**dataclasses.asdict(settings), "pool": pool_name, "n_texts": len(texts), "texts_key": texts_key}
    with begin_reduction(store, "textspan", record, allow_incomplete=allow_incomplete, force=force) as run:
        todo = [layer for layer in layers if not run.is_current(layer_group(layer))]
        per_layer = {layer: _stored_layer(store, layer) for layer in layers if layer not in todo}
        if todo:
            per_layer.update(_search_layers(run, todo, texts, settings, pool_name, texts_key, executor, loaded))
    rows: dict[str, list] = {k: [] for k in ("layer", "head", "rank", "text", "variance", "explained_ratio")}
    for layer in layers:
        stacked = per_layer[layer]
        for head in range(stacked["indices"].shape[0]):
            for rank, (j, var, ratio) in enumerate(zip(stacked["indices"][head], stacked["variances"][head],
                                                       stacked["explained_ratio"][head])):
                rows["layer"].append(layer)
                rows["head"].append(head)
                rows["rank"].append(rank)
                rows["text"].append(texts[int(j)])
                rows["variance"].append(float(var))
                rows["explained_ratio"].append(float(ratio))
    return pa.table(rows)


def _stored_layer(store: RunStore, layer: int) -> dict[str, np.ndarray]:
    return {key: store.read_result(f"{layer_group(layer)}/{key}") for key in ("indices", "variances", "explained_ratio")}


def _search_layers(run: Reduction, layers: Sequence[int], texts: Sequence[str], settings: TextSpanSettings,
                   pool_name: str, texts_key: str, executor: Executor | None, loaded: LoadedModel | None
                   ) -> dict[int, dict[str, np.ndarray]]:
    """The greedy search for every head of `layers`; each layer's group written whole when writable."""
    store = run.store
    embeddings = cached_text_embeddings(store, texts, pool_name=pool_name, loaded=loaded)
    executor = executor if executor is not None else LocalExecutor()
    stats = head_statistics(store, layers, normalize=settings.normalize, executor=executor)
    flat = [s for per_layer in stats for s in per_layer]
    search = _HeadSearch(embeddings, settings)
    results = executor.fan_out(search, flat, desc="textspan search", unit="heads")
    n_heads = len(stats[0])
    if settings.span_rank == "auto":
        _notice_capped_ranks(layers, [r["span_rank"] for r in results])
    out = {}
    for i, layer in enumerate(layers):
        per_head = results[i * n_heads:(i + 1) * n_heads]
        stacked = {k: np.stack([r[k] for r in per_head]) for k in ("indices", "variances", "explained_ratio")}
        attrs = {"pool": pool_name, "n_texts": len(texts), "basis_size": settings.basis_size,
                 "span_rank": settings.span_rank, "span_ranks_used": [int(r["span_rank"]) for r in per_head],
                 "normalize": settings.normalize, "texts_key": texts_key}
        if store.mode == "r+":
            run.write_group(layer_group(layer), {k: (v, schema.TEXTSPAN.dims(k), attrs) for k, v in stacked.items()}, attrs)
        out[layer] = stacked
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


def format_textspan(table: pa.Table, per_head: int = 5) -> str:
    """Per head: its first picks and the share of the head's variance they explain."""
    lines = []
    data = table.to_pydict()
    keys = sorted(set(zip(data["layer"], data["head"])))
    for layer, head in keys:
        idx = [i for i, (l, h) in enumerate(zip(data["layer"], data["head"])) if (l, h) == (layer, head)]
        idx.sort(key=lambda i: data["rank"][i])
        explained = sum(data["explained_ratio"][i] for i in idx)
        shown = "; ".join(data["text"][i] for i in idx[:per_head])
        lines.append(f"L{layer}H{head} ({explained:.0%} of variance in {len(idx)} texts): {shown}")
    return "\n".join(lines)
