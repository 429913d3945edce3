"""TextSpan for every head of chosen layers, from statistics streamed out of a store.

Text embeddings of a pool are computed once with the run's model and cached in the store under
`text_embeddings/<key>/embeddings` (key = hash of the pool's texts and the model identity). Each head's greedy
search is independent and K-independent in cost, so heads are spread as Ray tasks when Ray runs.
Results land under `reductions/textspan/layer_{l}/…` and as a long table (one row per pick).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from clipscope.errors import ConfigError
from clipscope.kernels.textspan import DEFAULT_SPAN_RANK, TextSpanStats, textspan_from_stats
from clipscope.pipelines.models.loading import LoadedModel
from clipscope.pipelines.texts.embedding_cache import cached_text_embeddings, embeddings_key
from clipscope.pipelines.jobs.means.job import head_statistics
from clipscope.storage.store import RunStore

RESULT_PREFIX = "reductions/textspan"


@dataclass(frozen=True)
class TextSpanSettings:
    basis_size: int = 10
    span_rank: int = DEFAULT_SPAN_RANK
    normalize: bool = True

    def __post_init__(self) -> None:
        for name in ("basis_size", "span_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer ≥ 1, got {value!r}")


@dataclass(frozen=True)
class _HeadSearch:
    """Picklable per-head task: the greedy search on one head's statistics."""

    texts: np.ndarray
    settings: TextSpanSettings

    def __call__(self, stats: TextSpanStats) -> dict[str, np.ndarray]:
        # m cannot exceed the span the texts are projected on (r, K and D) nor the pool itself
        usable = min(self.settings.basis_size, self.texts.shape[0], self.settings.span_rank, stats.count, stats.dim)
        result = textspan_from_stats(stats, torch.from_numpy(self.texts).double(), basis_size=usable,
                                     span_rank=self.settings.span_rank)
        return {"indices": result.indices.numpy(), "variances": result.variances.numpy(),
                "explained_ratio": result.explained_ratio.numpy(),
                "total_variance": np.float64(result.total_variance)}


def run_textspan(store: RunStore, layers: Sequence[int], texts: Sequence[str], *,
                 settings: TextSpanSettings = TextSpanSettings(), pool_name: str = "custom",
                 use_ray: bool = False, loaded: LoadedModel | None = None) -> pa.Table:
    """TextSpan for every head of `layers`; writes the results into the store, returns the table."""
    embeddings = cached_text_embeddings(store, texts, pool_name=pool_name, loaded=loaded)
    stats = head_statistics(store, layers, normalize=settings.normalize, use_ray=use_ray)
    flat = [s for per_layer in stats for s in per_layer]
    search = _HeadSearch(embeddings, settings)
    if use_ray:
        from clipscope.cluster.reduce import fan_out

        results = fan_out(search, flat)
    else:
        results = [search(s) for s in flat]
    n_heads = len(stats[0])
    rows: dict[str, list] = {k: [] for k in ("layer", "head", "rank", "text", "variance", "explained_ratio")}
    for i, layer in enumerate(layers):
        per_head = results[i * n_heads:(i + 1) * n_heads]
        stacked = {k: np.stack([r[k] for r in per_head]) for k in ("indices", "variances", "explained_ratio")}
        attrs = {"pool": pool_name, "n_texts": len(texts), "basis_size": settings.basis_size,
                 "span_rank": settings.span_rank, "normalize": settings.normalize,
                 "texts_key": embeddings_key(texts, store.attrs.get("model", {}))}
        if store.mode == "r+":
            store.delete_results(f"{RESULT_PREFIX}/layer_{layer}")  # an earlier run may have had another m
            for key, value in stacked.items():
                store.write_result(f"{RESULT_PREFIX}/layer_{layer}/{key}", value, ("head", "pick"), attrs)
        for head, result in enumerate(per_head):
            for rank, (j, var, ratio) in enumerate(zip(result["indices"], result["variances"],
                                                       result["explained_ratio"])):
                rows["layer"].append(layer)
                rows["head"].append(head)
                rows["rank"].append(rank)
                rows["text"].append(texts[int(j)])
                rows["variance"].append(float(var))
                rows["explained_ratio"].append(float(ratio))
    return pa.table(rows)


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
