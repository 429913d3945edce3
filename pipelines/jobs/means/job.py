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
from clipscope.pipelines.jobs.means.result import Result, resolved_names
from clipscope.pipelines.jobs.means.settings import Settings
from clipscope.storage.layout import row_slices
from clipscope.storage import schema
from clipscope.storage.results import begin_reduction, extraction_fingerprint
from clipscope.storage.store import RunStore

log = logging.getLogger(__name__)


def row_blocks(store: RunStore, chunks_per_block: int = 4) -> list[slice]:
    """Chunk-aligned row ranges covering the store."""
    return row_slices(store.n_rows, store.rows_per_chunk * chunks_per_block)


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


def compute_means(store: RunStore, names: Sequence[str] | None = None, *,
                  executor: Executor | None = None) -> Result:
    """Mean over valid rows of `names` (None: every direct-effect and second-order array), not written."""
    settings = Settings(names=None if names is None else tuple(names))
    names = resolved_names(store, settings)
    sums = reduce_rows(executor, store, row_blocks(store), _SumBlock(store, names), _add_sums, desc="means")
    if sums["count"] == 0:
        raise ConfigError(f"{store.url} has no valid rows to average")
    return Result(settings, {name: sums[name] / sums["count"] for name in names}, sums["count"])


def stale_means(store: RunStore, names: Sequence[str]) -> list[str]:
    """The names whose `reductions/means` entry is missing or was written for another number of valid rows
    or another extraction (its done shards and their row checksums)."""
    count = int(store.read_valid().sum())
    inputs = extraction_fingerprint(store)
    existing = set(store.array_names())
    stale = []
    for n in names:
        name = schema.MEANS.path(array=n)
        attrs = store.array(name).attrs if name in existing else {}
        # a mean written before clipscope recorded the extraction's fingerprint is judged by its count alone
        recorded = attrs.get("inputs", inputs)
        if name not in existing or attrs.get("count") != count or recorded != inputs:
            stale.append(n)
    return stale


def _refreshed(store: RunStore, settings: Settings, stale: Sequence[str], executor: Executor | None) -> Result:
    """The means of `settings`: `stale` ones computed in one pass (and stored when the store is writable),
    the others read from `reductions/means`."""
    names = resolved_names(store, settings)
    fresh = compute_means(store, stale, executor=executor) if stale else None
    if fresh is not None and store.mode == "r+":
        fresh.write(store)
    means = {n: fresh.means[n] if fresh is not None and n in fresh.means
             else store.read_result(schema.MEANS.path(array=n)).astype(np.float64) for n in names}
    count = fresh.count if fresh is not None else int(store.read_valid().sum())
    return Result(settings, means, count)


def current_means(store: RunStore, names: Sequence[str], *,
                  executor: Executor | None = None) -> dict[str, np.ndarray]:
    """Dataset means (float64) of `names`: up-to-date ones are read from `reductions/means`, the
    others computed in one pass (and stored when the store is writable)."""
    return _refreshed(store, Settings(names=tuple(names)), stale_means(store, names), executor).means


def run(store: RunStore, settings: Settings, executor: Executor | None = None) -> Result:
    """The means reduction on its own: refuses an incomplete store (unless `allow_incomplete`), holds
    the store's lock, recomputes only stale means (all of them with `force`)."""
    names = resolved_names(store, settings)
    with begin_reduction(store, "means", {"names": list(names)}, allow_incomplete=settings.allow_incomplete,
                         force=settings.force):
        stale = list(names) if settings.force else stale_means(store, names)
        if not stale:
            log.info("means: reductions/means is up to date for %d arrays (same extraction), not recomputed; "
                     "force recomputes it", len(names))
        return _refreshed(store, settings, stale, executor)


def head_positions(store: RunStore, layers: Sequence[int]) -> list[int]:
    stored = list(store.info.heads_layers)
    missing = [l for l in layers if l not in stored]
    if missing:
        raise ConfigError(f"layers {missing} have no head terms in {store.url}; stored: {stored}; head terms are made "
                          f"by `clipscope extract … --heads-layers {' '.join(map(str, missing))}`")
    return [stored.index(l) for l in layers]


@dataclass(frozen=True)
class HeadStatsBlock:
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


def merge_head_stats(a, b):
    return [[merge_stats(x, y) for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]


def head_statistics(store: RunStore, layers: Sequence[int], *, normalize: bool = True,
                    executor: Executor | None = None) -> list[list[TextSpanStats]]:
    """ΣC, ΣCᵀC and K per (layer, head) over all valid images: what TextSpan needs, streamed.

    `normalize` divides each image's head terms by ‖image_embedding‖, as the reference code does.
    """
    positions = tuple(head_positions(store, layers))
    return reduce_rows(executor, store, row_blocks(store), HeadStatsBlock(store, positions, normalize),
                       merge_head_stats, desc="textspan statistics")
