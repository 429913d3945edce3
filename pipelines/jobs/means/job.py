"""Reductions over a store's row blocks: map every block (valid rows only), tree-reduce the partials.

The same map and combine functions run through the job's executor (`cluster.executor`: in this
process or on Ray); the tree is fixed by block order, so results do not depend on worker count or
scheduling. Partials are summaries (float64 sums, TextSpan statistics), never rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from clipscope.cluster.executor import Executor, LocalExecutor
from clipscope.errors import ConfigError
from clipscope.kernels.textspan import TextSpanStats, merge_stats, textspan_stats
from clipscope.storage.layout import row_slices
from clipscope.storage import schema
from clipscope.storage.results import begin_reduction, extraction_fingerprint, store_lock
from clipscope.storage.store import RunStore

log = logging.getLogger(__name__)

MEAN_PREFIX = "reductions/means"  # schema.MEANS: reductions/means/<array>


def row_blocks(store: RunStore, chunks_per_block: int = 4) -> list[slice]:
    """Chunk-aligned row ranges covering the store."""
    return row_slices(store.n_rows, store.rows_per_chunk * chunks_per_block)


def mean_array_names(store: RunStore) -> list[str]:
    """Per-sample arrays whose dataset mean is needed for mean-ablation."""
    sources = (schema.IMAGE_EMBEDDING, schema.DIRECT_EMBEDDING, schema.DIRECT_BIAS, schema.DIRECT_MLPS,
               schema.DIRECT_HEADS, schema.DIRECT_CLS_TOKEN, schema.DIRECT_TOKENS, schema.SECOND_ORDER_WEIGHTS,
               schema.SECOND_ORDER_SHARED)
    return [n for n in store.array_names(per_sample=True) if any(d.matches(n) is not None for d in sources)]


@dataclass(frozen=True)
class _SumBlock:
    """Picklable map function: float64 sums of chosen arrays over the valid rows of one block."""

    store: RunStore
    names: tuple[str, ...]

    def __call__(self, rows: slice) -> dict[str, Any]:
        valid = self.store.read_valid(rows)
        out: dict[str, Any] = {"count": int(valid.sum())}
        for name in self.names:
            values = self.store.read(name, rows)[valid].astype(np.float64)
            out[name] = values.sum(0) if len(values) else np.zeros(values.shape[1:], np.float64)
        return out


def _add_sums(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {key: a[key] + b[key] for key in a}


def valid_counts(store: RunStore, blocks: Sequence[slice]) -> list[int]:
    """Valid rows (images) per block: the sizes a job's progress counts in."""
    valid = store.read_valid()
    return [int(valid[block].sum()) for block in blocks]


def reduce_rows(executor: Executor | None, store: RunStore, blocks: Sequence[slice], map_fn, combine_fn, *,
                desc: str) -> Any:
    """`executor.map_reduce` over row blocks (None: in this process), progress counted in images."""
    executor = executor if executor is not None else LocalExecutor()
    return executor.map_reduce(blocks, map_fn, combine_fn, desc=desc, unit="img", sizes=valid_counts(store, blocks))


def dataset_means(store: RunStore, names: Sequence[str] | None = None, *, executor: Executor | None = None,
                  write: bool = True) -> dict[str, np.ndarray]:
    """Mean over valid rows of every direct-effect and second-order array (for mean-ablation).

    Each mean is written as one array (complete or absent) under the store's lock, with the number of
    rows it averages and the extraction's fingerprint in its attributes (see `stale_means`).
    """
    names = tuple(mean_array_names(store) if names is None else names)
    sums = reduce_rows(executor, store, row_blocks(store), _SumBlock(store, names), _add_sums, desc="means")
    if sums["count"] == 0:
        raise ConfigError(f"{store.url} has no valid rows to average")
    means = {name: sums[name] / sums["count"] for name in names}
    if write:
        attrs: dict[str, Any] = {"count": sums["count"]}
        inputs = extraction_fingerprint(store)
        if inputs is not None:
            attrs["inputs"] = inputs
        with store_lock(store, "clipscope means"):
            for name, mean in means.items():
                dims = store.dims(name)[1:]
                store.write_result(schema.MEANS.path(array=name), mean, dims, attrs)
    return means


def stale_means(store: RunStore, names: Sequence[str]) -> list[str]:
    """The names whose `reductions/means` entry is missing or was written for another number of valid rows
    or another extraction (its done shards and their row checksums)."""
    count = int(store.read_valid().sum())
    inputs = extraction_fingerprint(store)
    existing = set(store.array_names())
    stale = []
    for n in names:
        name = f"{MEAN_PREFIX}/{n}"
        attrs = store.array(name).attrs if name in existing else {}
        # a mean written before clipscope recorded the extraction's fingerprint is judged by its count alone
        recorded = attrs.get("inputs", inputs)
        if name not in existing or attrs.get("count") != count or recorded != inputs:
            stale.append(n)
    return stale


def current_means(store: RunStore, names: Sequence[str], *,
                  executor: Executor | None = None) -> dict[str, np.ndarray]:
    """Dataset means (float64) of `names`: up-to-date ones are read from `reductions/means`, the
    others computed in one pass (and stored when the store is writable)."""
    stale = stale_means(store, names)
    fresh = dataset_means(store, stale, executor=executor, write=store.mode == "r+") if stale else {}
    return {n: fresh[n] if n in fresh else store.read_result(f"{MEAN_PREFIX}/{n}").astype(np.float64)
            for n in names}


def run_means(store: RunStore, names: Sequence[str] | None = None, *, executor: Executor | None = None,
              allow_incomplete: bool = False, force: bool = False) -> dict[str, np.ndarray]:
    """The means reduction on its own: refuses an incomplete store (unless `allow_incomplete`), holds
    the store's lock, recomputes only stale means (all of them with `force`)."""
    names = tuple(mean_array_names(store) if names is None else names)
    with begin_reduction(store, "means", {"names": list(names)}, allow_incomplete=allow_incomplete,
                         force=force):
        if force:
            return dataset_means(store, names, executor=executor, write=store.mode == "r+")
        stale = stale_means(store, names)
        if not stale:
            log.info("means: reductions/means is up to date for %d arrays (same extraction), not recomputed; "
                     "force recomputes it", len(names))
        return current_means(store, names, executor=executor)


def head_positions(store: RunStore, layers: Sequence[int]) -> list[int]:
    stored = list(store.info.heads_layers)
    missing = [l for l in layers if l not in stored]
    if missing:
        raise ConfigError(f"layers {missing} have no head terms in {store.url}; stored: {stored}; head terms are made "
                          f"by `clipscope extract … --heads-layers {' '.join(map(str, missing))}`")
    return [stored.index(l) for l in layers]


@dataclass(frozen=True)
class _HeadStatsBlock:
    """Picklable map function: TextSpan statistics of every (layer, head) over one block's valid rows."""

    store: RunStore
    positions: tuple[int, ...]
    normalize: bool

    def __call__(self, rows: slice) -> list[list[TextSpanStats]]:
        valid = self.store.read_valid(rows)
        heads = self.store.array(schema.DIRECT_HEADS.path())[rows][valid][:, list(self.positions)].astype(np.float64)
        if self.normalize:
            norms = np.linalg.norm(self.store.read(schema.IMAGE_EMBEDDING.path(), rows)[valid].astype(np.float64), axis=-1)
            heads = heads / np.maximum(norms, 1e-12)[:, None, None, None]
        c = torch.from_numpy(heads)  # [sample layer head embed]
        return [[textspan_stats(c[:, i, h]) for h in range(c.shape[2])] for i in range(c.shape[1])]


def _merge_head_stats(a, b):
    return [[merge_stats(x, y) for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]


def head_statistics(store: RunStore, layers: Sequence[int], *, normalize: bool = True,
                    executor: Executor | None = None) -> list[list[TextSpanStats]]:
    """ΣC, ΣCᵀC and K per (layer, head) over all valid images: what TextSpan needs, streamed.

    `normalize` divides each image's head terms by ‖image_embedding‖, as the reference code does.
    """
    positions = tuple(head_positions(store, layers))
    return reduce_rows(executor, store, row_blocks(store), _HeadStatsBlock(store, positions, normalize),
                       _merge_head_stats, desc="textspan statistics")
