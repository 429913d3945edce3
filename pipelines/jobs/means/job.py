"""Reductions over a store's row blocks: map every block (valid rows only), tree-reduce the partials.

The same map and combine functions run on Ray (`cluster.reduce.map_reduce`) or in this process
(`map_reduce_local`); the tree is fixed by block order, so results do not depend on worker count or
scheduling. Partials are summaries (float64 sums, TextSpan statistics), never rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from clipscope.errors import ConfigError
from clipscope.kernels.textspan import TextSpanStats, merge_stats, textspan_stats
from clipscope.storage.layout import row_slices
from clipscope.storage.store import RunStore

MEAN_PREFIX = "reductions/means"


def row_blocks(store: RunStore, chunks_per_block: int = 4) -> list[slice]:
    """Chunk-aligned row ranges covering the store."""
    return row_slices(store.n_rows, store.rows_per_chunk * chunks_per_block)


def mean_array_names(store: RunStore) -> list[str]:
    """Per-sample arrays whose dataset mean is needed for mean-ablation."""
    return [n for n in store.array_names(per_sample=True)
            if n == "image_embedding" or n.startswith("direct/")
            or (n.startswith("second_order/") and not n.endswith("/directions"))]


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


def _map_reduce(blocks, map_fn, combine_fn, use_ray: bool, cpus_per_task: float = 1):
    from clipscope.cluster.reduce import map_reduce, map_reduce_local

    if use_ray:
        return map_reduce(blocks, map_fn, combine_fn, num_cpus_per_task=cpus_per_task)
    return map_reduce_local(blocks, map_fn, combine_fn)


def dataset_means(store: RunStore, names: Sequence[str] | None = None, *, use_ray: bool = False,
                  write: bool = True, cpus_per_task: float = 1) -> dict[str, np.ndarray]:
    """Mean over valid rows of every direct-effect and second-order array (for mean-ablation)."""
    names = tuple(mean_array_names(store) if names is None else names)
    sums = _map_reduce(row_blocks(store), _SumBlock(store, names), _add_sums, use_ray, cpus_per_task)
    if sums["count"] == 0:
        raise ConfigError(f"{store.url} has no valid rows to average")
    means = {name: sums[name] / sums["count"] for name in names}
    if write:
        for name, mean in means.items():
            dims = store.dims(name)[1:]
            store.write_result(f"{MEAN_PREFIX}/{name}", mean, dims, {"count": sums["count"]})
    return means


def stale_means(store: RunStore, names: Sequence[str]) -> list[str]:
    """The names whose `reductions/means` entry is missing or was written for another number of valid rows."""
    count = int(store.read_valid().sum())
    existing = set(store.array_names())
    return [n for n in names if f"{MEAN_PREFIX}/{n}" not in existing
            or store.array(f"{MEAN_PREFIX}/{n}").attrs.get("count") != count]


def current_means(store: RunStore, names: Sequence[str], *, use_ray: bool = False) -> dict[str, np.ndarray]:
    """Dataset means (float64) of `names`: up-to-date ones are read from `reductions/means`, the
    others computed in one pass (and stored when the store is writable)."""
    stale = stale_means(store, names)
    fresh = dataset_means(store, stale, use_ray=use_ray, write=store.mode == "r+") if stale else {}
    return {n: fresh[n] if n in fresh else store.read_result(f"{MEAN_PREFIX}/{n}").astype(np.float64)
            for n in names}


def head_positions(store: RunStore, layers: Sequence[int]) -> list[int]:
    stored = store.attrs.get("layers", {}).get("heads", [])
    missing = [l for l in layers if l not in stored]
    if missing:
        raise ConfigError(f"layers {missing} have no head terms in {store.url}; stored: {stored}")
    return [stored.index(l) for l in layers]


@dataclass(frozen=True)
class _HeadStatsBlock:
    """Picklable map function: TextSpan statistics of every (layer, head) over one block's valid rows."""

    store: RunStore
    positions: tuple[int, ...]
    normalize: bool

    def __call__(self, rows: slice) -> list[list[TextSpanStats]]:
        valid = self.store.read_valid(rows)
        heads = self.store.array("direct/heads")[rows][valid][:, list(self.positions)].astype(np.float64)
        if self.normalize:
            norms = np.linalg.norm(self.store.read("image_embedding", rows)[valid].astype(np.float64), axis=-1)
            heads = heads / np.maximum(norms, 1e-12)[:, None, None, None]
        c = torch.from_numpy(heads)  # [sample layer head embed]
        return [[textspan_stats(c[:, i, h]) for h in range(c.shape[2])] for i in range(c.shape[1])]


def _merge_head_stats(a, b):
    return [[merge_stats(x, y) for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]


def head_statistics(store: RunStore, layers: Sequence[int], *, normalize: bool = True,
                    use_ray: bool = False, cpus_per_task: float = 1) -> list[list[TextSpanStats]]:
    """ΣC, ΣCᵀC and K per (layer, head) over all valid images: what TextSpan needs, streamed.

    `normalize` divides each image's head terms by ‖image_embedding‖, as the reference code does.
    """
    positions = tuple(head_positions(store, layers))
    return _map_reduce(row_blocks(store), _HeadStatsBlock(store, positions, normalize), _merge_head_stats,
                       use_ray, cpus_per_task)
