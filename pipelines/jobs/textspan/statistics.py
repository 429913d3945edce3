"""TextSpan statistics (K, ΣC, ΣCᵀC per head) as a stored reduction, written once and read by later searches.

Everything TextSpan computes from a head depends on its contributions only through these statistics
(kernels.textspan), so a search with another pool, another m or another span rank needs no pass over the
rows once they are stored. The spectrum of the uncentred ΣCᵀC (the search's two eigendecompositions, O(D³)
per head: most of a search's cost) is stored with them, computed by the same calls the search would make.
Group `reductions/head_statistics/{norm}/layer_{l}/{count,sum,gram,shift,eigenvalues,eigenvectors}`
(storage.schema.TEXTSPAN_STATISTICS; norm: "normalized" when the head terms are divided by ‖image
embedding‖, else "raw"), written whole (storage.results) with, in its attributes, the done extraction shards
it covers (index, row checksum, first row, row capacity) and the store's row count at the time.

`stored_head_statistics` returns exactly what `means.job.head_statistics` would stream:
  * stored statistics that cover exactly the store's done shards are read back (no row is read);
  * when done shards were added since (the store grew, or a shard finished; the covered ones keep their
    checksum and rows), only the new shards' rows are reduced (same map function, fixed tree) and merged
    into the stored statistics, which are rewritten;
  * otherwise (first run, a shard redone or moved, `force`) every row is streamed by `head_statistics`
    itself (the same fixed tree, so the statistics, hence the picks, are bit for bit today's) and stored.
A merge after growth equals a full recomputation up to float64 rounding (another summation tree), not bit
for bit. Stores without a shard manifest (built row by row, no `row_blocks` attribute) are always streamed.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from clipscope.cluster.executor import Executor
from clipscope.kernels.textspan import TextSpanStats, merge_stats
from clipscope.pipelines.jobs.means.job import (
    HeadStatsBlock,
    merge_head_stats,
    head_positions,
    head_statistics,
    reduce_rows,
)
from clipscope.storage import schema
from clipscope.storage.layout import row_slices
from clipscope.storage.results import begin_reduction
from clipscope.storage.store import RunStore

JOB = "textspan statistics"
CHUNKS_PER_BLOCK = 4  # as means.job.row_blocks


def group(layer: int, normalize: bool) -> str:
    return schema.TEXTSPAN_STATISTICS.path(norm="normalized" if normalize else "raw", layer=layer)


def done_shards(store: RunStore) -> dict[int, tuple] | None:
    """Done extraction shards → (row checksum, first row, row capacity); None without a shard manifest."""
    blocks = store.attrs.get("row_blocks")
    if not blocks:
        return None
    records = store.shard_records(stage="extract")
    return {int(i): (r.get("checksum"), *(int(v) for v in blocks[int(i)]))
            for i, r in records.items() if r.get("status") == "done" and int(i) < len(blocks)}


def _covered(attrs: dict[str, Any]) -> dict[int, tuple]:
    return {int(entry[0]): tuple(entry[1:]) for entry in attrs.get("shards", [])}


def read_statistics(store: RunStore, layer: int, normalize: bool) -> tuple[list[TextSpanStats], dict] | None:
    """The stored statistics of `layer`'s heads and the group's attributes, or None if not stored."""
    name = group(layer, normalize)
    existing = set(store.array_names())
    if any(f"{name}/{leaf}" not in existing for leaf in schema.TEXTSPAN_STATISTICS.leaves):
        return None
    arrays = {leaf: store.read_result(f"{name}/{leaf}") for leaf in schema.TEXTSPAN_STATISTICS.leaves}
    tensor = {leaf: torch.from_numpy(np.asarray(value, np.float64)) for leaf, value in arrays.items() if leaf != "count"}
    # eigenvectors in the column-major layout torch.linalg.eigh returns: the products the search takes of them
    # then round exactly as on a freshly computed spectrum
    stats = [TextSpanStats(int(arrays["count"][h]), tensor["sum"][h], tensor["gram"][h], tensor["shift"][h],
                           (tensor["eigenvalues"][h], tensor["eigenvectors"][h].mT.contiguous().mT))
             for h in range(arrays["count"].shape[0])]
    return stats, dict(store.array(f"{name}/count").attrs)


def _new_rows(store: RunStore, shards: dict[int, tuple], added: Sequence[int]) -> list[slice]:
    """Chunk-aligned row blocks covering the rows of the `added` shards."""
    size = store.rows_per_chunk * CHUNKS_PER_BLOCK
    blocks = []
    for i in sorted(added):
        _, start, capacity = shards[i]
        blocks += [slice(start + s.start, start + s.stop) for s in row_slices(capacity, size)]
    return blocks


def stored_head_statistics(store: RunStore, layers: Sequence[int], *, normalize: bool = True,
                           executor: Executor | None = None, allow_incomplete: bool = False,
                           force: bool = False) -> list[list[TextSpanStats]]:
    """`head_statistics(store, layers, normalize=…)`, from the stored reduction where it is current (see the
    module's docstring; `force` streams every row again); fresh or updated statistics are written back when
    the store is writable."""
    shards = done_shards(store)
    if shards is None:
        return head_statistics(store, layers, normalize=normalize, executor=executor)
    out: dict[int, list[TextSpanStats]] = {}
    stale: list[int] = []
    grown: dict[tuple[int, ...], list[int]] = {}
    for layer in layers:
        stored = None if force else read_statistics(store, layer, normalize)
        if stored is None:
            stale.append(layer)
            continue
        stats, attrs = stored
        covered = _covered(attrs)
        if covered == shards:
            out[layer] = stats
        elif all(shards.get(i) == checksum for i, checksum in covered.items()):
            out[layer] = stats
            grown.setdefault(tuple(sorted(set(shards) - set(covered))), []).append(layer)
        else:
            stale.append(layer)
    written = list(stale)
    if stale:
        out.update(zip(stale, head_statistics(store, stale, normalize=normalize, executor=executor)))
    for added, grown_layers in grown.items():
        positions = tuple(head_positions(store, grown_layers))
        new = reduce_rows(executor, store, _new_rows(store, shards, added), HeadStatsBlock(store, positions, normalize),
                          merge_head_stats, desc="textspan statistics (new shards)")
        for layer, fresh in zip(grown_layers, new):
            out[layer] = [merge_stats(old, part) for old, part in zip(out[layer], fresh)]
        written += grown_layers
    for layer in written:  # the spectrum the search needs, computed once here and stored with the sums
        out[layer] = [stats.with_spectrum() for stats in out[layer]]
    if written and store.mode == "r+":
        _write(store, {layer: out[layer] for layer in written}, normalize, shards, allow_incomplete)
    return [out[layer] for layer in layers]


def _write(store: RunStore, per_layer: dict[int, list[TextSpanStats]], normalize: bool, shards: dict[int, Any],
           allow_incomplete: bool) -> None:
    attrs = {"normalize": normalize, "n_rows": store.n_rows, "shards": [[i, *shards[i]] for i in sorted(shards)]}
    decl = schema.TEXTSPAN_STATISTICS
    with begin_reduction(store, JOB, {"normalize": normalize}, allow_incomplete=allow_incomplete) as reduction:
        for layer, stats in per_layer.items():
            arrays = {
                "count": np.array([s.count for s in stats], np.int64),
                "sum": torch.stack([s.sum for s in stats]).numpy(),
                "gram": torch.stack([s.gram for s in stats]).numpy(),
                "shift": torch.stack([s.shift for s in stats]).numpy(),
                "eigenvalues": torch.stack([s.spectrum[0] for s in stats]).numpy(),
                "eigenvectors": torch.stack([s.spectrum[1] for s in stats]).numpy(),
            }
            reduction.write_group(group(layer, normalize),
                                  {leaf: (value, decl.dims(leaf), attrs) for leaf, value in arrays.items()}, attrs)
