"""`clipscope rosetta ANCHOR OTHER...`: Rosetta Neurons over a model zoo, exact and streamed (docs/methods.md).

Pass A (map-reduce over row blocks, fixed tree): per-unit mean and std of every model's native maps.
Pass B: the anchor × model correlation matrices (then anchor × anchor, for the rows of the anchor units
that are in tuples, for the self best buddies), cut into
tiles of ≤ `tile` units per side within one resolution group (all layer pairs of the same two native
sizes share one grid). A tile task streams the row blocks through `kernels.rosetta.pair_stats_update`
(float64 sums of the pass-A-shifted maps, bilinearly resized to the pair's larger grid) and returns the
tile's Pearson coefficients; the driver keeps only each row's and column's K_keep strongest partners
(`kernels.rosetta_topk`), so no full matrix is held (unless `keep_matrix`). A done marker per tile
(manifest stage ``rosetta-{name}``) holds the tile's top lists: a killed run resumes without recomputing
finished tiles, and the lists merge to the same bytes whatever order they arrive in.
Then: best buddies, the multi-model tuples (Eq. 4.4), concepts (connected components of self best
buddies), and the dictionary (pass C: top images per concept).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from typing import Any, Callable

import numpy as np
import torch

from clipscope.cluster.executor import Executor, open_executor
from clipscope.errors import ParameterError
from clipscope.kernels.rosetta import cluster_units, merge_pair_stats, rosetta_units
from clipscope.kernels.rosetta_topk import buddies_from_topk, empty_topk, merge_topk, tile_topk
from clipscope.pipelines.jobs.rosetta import tiles
from clipscope.pipelines.jobs.rosetta.result import Result, model_label, result_group
from clipscope.pipelines.jobs.rosetta.settings import RosettaSettings
from clipscope.pipelines.jobs.rosetta.sources import Source, check_aligned, common_valid, open_source
from clipscope.storage.layout import row_slices
from clipscope.storage.results import begin_reduction
from clipscope.storage.store import RunStore

logger = logging.getLogger(__name__)

# tiles handed to the executor at once; their done markers are written when the wave returns
WAVE = 8


def open_inputs(store: RunStore, settings: RosettaSettings) -> tuple[list[RunStore], list[Source]]:
    """The anchor and the other stores as row-aligned map sources (ConfigError on any mismatch)."""
    stores = [store]
    for url in settings.others:
        stores.append(RunStore.open(url, "r"))
    sources = [open_source(s, settings.layers_of(i), "the anchor" if i == 0 else f"model {i}")
               for i, s in enumerate(stores)]
    check_aligned(stores, sources)
    return stores, sources


def _sizes(source: Source) -> list[tuple[int, int]]:
    return list(dict.fromkeys(layer.size for layer in source.layers))


def _ids_of_size(source: Source, size: tuple[int, int]) -> np.ndarray:
    ids = []
    for offset, layer in zip(source.offsets(), source.layers):
        if layer.size == size:
            ids.extend(range(offset, offset + layer.channels))
    return np.asarray(ids, np.int64)


def _cut(ids: np.ndarray, tile: int) -> list[np.ndarray]:
    return [ids[s:s + tile] for s in range(0, len(ids), tile)]


def plan_tiles(sources: list[Source], tile: int) -> list[tiles.Tile]:
    """The anchor × model tiles in a fixed order: models 1…M, resolution groups, anchor tiles, model tiles."""
    out: list[tiles.Tile] = []
    group = 0
    for model in range(1, len(sources)):
        for sa in _sizes(sources[0]):
            for sb in _sizes(sources[model]):
                for a in _cut(_ids_of_size(sources[0], sa), tile):
                    for b in _cut(_ids_of_size(sources[model], sb), tile):
                        out.append(tiles.Tile(len(out), model, group, a, b))
                group += 1
    return out


def plan_self_tiles(sources: list[Source], rows: np.ndarray, tile: int, start: int) -> list[tiles.Tile]:
    """The anchor × anchor tiles of the rows `rows` (the anchor units of the tuples) against every anchor unit,
    indexed from `start` (after the model tiles)."""
    out: list[tiles.Tile] = []
    group = 0
    for sa in _sizes(sources[0]):
        mine = np.intersect1d(_ids_of_size(sources[0], sa), rows)
        for sb in _sizes(sources[0]):
            for a in _cut(mine, tile):
                for b in _cut(_ids_of_size(sources[0], sb), tile):
                    out.append(tiles.Tile(start + len(out), 0, group, a, b))
            group += 1
    return out


def _blocks(valid: np.ndarray, settings: RosettaSettings, rows_per_chunk: int) -> list[np.ndarray]:
    if settings.score == "reference":  # the official batches: consecutive valid rows
        rows = np.flatnonzero(valid)
        return [rows[s:s + settings.reference_batch] for s in range(0, len(rows), settings.reference_batch)]
    return row_blocks(valid, rows_per_chunk * settings.chunks_per_block)


def row_blocks(valid: np.ndarray, rows_per_block: int) -> list[np.ndarray]:
    """The valid rows of each block of `rows_per_block` store rows (blocks without one left out)."""
    blocks = []
    for block in row_slices(len(valid), rows_per_block):
        rows = np.flatnonzero(valid[block]) + block.start
        if len(rows):
            blocks.append(rows)
    return blocks


def _sum_reference(a, b):
    return [(ma + mb, va + vb) for (ma, va), (mb, vb) in zip(a, b)]


def unit_moments(executor: Executor, sources: list[Source], blocks: list[np.ndarray], score: str):
    """Per model (mean, std) per unit: pass A (native maps; reference: pooled per-batch moments)."""
    if score == "reference":
        sums = executor.map_reduce(blocks, functools.partial(tiles.reference_moments_batch, sources),
                                   _sum_reference, desc="rosetta moments", unit="batches")
        return [(m / len(blocks), np.sqrt(v / len(blocks))) for m, v in sums]
    parts = executor.map_reduce(blocks, functools.partial(tiles.moments_block, sources), tiles.merge_moments,
                                desc="rosetta moments", unit="blocks", sizes=[len(b) for b in blocks])
    return [(mean, np.sqrt(np.maximum(m2 / np.where(n > 0, n, 1), 0))) for n, mean, m2 in parts]


def _digest(store: RunStore, settings: RosettaSettings, sources: list[Source]) -> str:
    payload = {"settings": settings.statistics_record(), "inputs": [s.url for s in sources],
               "units": [[(l.name, l.channels, l.height, l.width) for l in s.layers] for s in sources],
               "rows": store.n_rows}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _topk_json(values: torch.Tensor, index: torch.Tensor) -> dict[str, list]:
    v = [[None if not np.isfinite(x) else float(x) for x in row] for row in values.tolist()]
    return {"values": v, "index": index.tolist()}


def _topk_from_json(data: dict[str, list]) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.tensor([[float("-inf") if x is None else x for x in row] for row in data["values"]],
                          dtype=torch.float64)
    return values, torch.tensor(data["index"], dtype=torch.int64)


def tile_partials(tile: tiles.Tile, corr: np.ndarray, k_keep: int, keep_matrix: bool) -> dict[str, Any]:
    """The done record's payload of a tile: the top lists of its rows and columns (and its matrix); a self
    tile keeps its rows' lists only, without the unit itself (r = 1)."""
    c = torch.from_numpy(np.array(corr, np.float64))
    if not tile.model:
        c[torch.from_numpy(tile.a_ids[:, None] == tile.b_ids[None, :])] = float("-inf")
    out: dict[str, Any] = {"rows": _topk_json(*tile_topk(c, torch.from_numpy(tile.b_ids), k_keep))}
    if tile.model:
        out["cols"] = _topk_json(*tile_topk(c.T, torch.from_numpy(tile.a_ids), k_keep))
    if keep_matrix and tile.model:
        out["corr"] = corr.astype(np.float32).astype(float).tolist()
    return out


def _merge_into(lists: dict[str, tuple[torch.Tensor, torch.Tensor]], key: str, ids: np.ndarray,
                part: tuple[torch.Tensor, torch.Tensor], k: int) -> None:
    values, index = lists[key]
    at = torch.from_numpy(ids)
    merged = merge_topk(values[at], index[at], part[0], part[1], k)
    values[at], index[at] = merged


def compute_tiles(executor: Executor, store: RunStore, settings: RosettaSettings, work: tiles.TileWork,
                  plan: list[tiles.Tile], digest: str,
                  on_tile: Callable[[tiles.Tile, bool], None] | None) -> dict[int, dict[str, Any]]:
    """Every tile's record: read back from its done marker when one of this run exists, else computed."""
    stage = f"rosetta-{settings.name}"
    records = {} if settings.force else {i: r for i, r in store.shard_records(stage=stage).items()
                                         if r.get("status") == "done" and r.get("digest") == digest}
    pending = [t for t in plan if t.index not in records]
    if records:
        logger.info("rosetta %s: %d of %d tiles done before, %d to compute", settings.name, len(records),
                    len(plan), len(pending))
    for tile in plan:
        if tile.index in records and on_tile is not None:
            on_tile(tile, True)
    for start in range(0, len(pending), WAVE):
        wave = pending[start:start + WAVE]
        began = time.time()
        if settings.split_rows and settings.score == "pearson":  # tasks of (tile, row block), a fixed tree per tile
            results = [tiles.tile_pearson(executor.map_reduce(
                work.blocks, functools.partial(tiles.tile_block_stats, work, tile), merge_pair_stats,
                fanin=tiles.FANIN, desc="rosetta tile rows", unit="blocks")) for tile in wave]
        else:
            results = executor.fan_out(functools.partial(tiles.tile_task, work), wave, desc="rosetta tiles",
                                       unit="tiles")
        for tile, corr in zip(wave, results):
            record = {"url": "tile", "count": int(corr.size), "valid": 0, "errors": 0,
                      "seconds": round(time.time() - began, 3), "checksum": digest, "digest": digest,
                      "tile": tile.describe(), **tile_partials(tile, corr, settings.k_keep, settings.keep_matrix)}
            store.mark_shard_done(tile.index, record, stage=stage)
            records[tile.index] = record
            if on_tile is not None:
                on_tile(tile, False)
    return records


def merge_tiles(sources: list[Source], plan: list[tiles.Tile], records: dict[int, dict[str, Any]],
                settings: RosettaSettings) -> dict[str, Any]:
    """Row/column top lists per model (and the anchor's self lists of the planned self tiles), merged from
    every tile (fixed order)."""
    k, n_a = settings.k_keep, sources[0].n_units
    lists = {f"row{m}": empty_topk(n_a, k) for m in range(1, len(sources))}
    lists.update({f"col{m}": empty_topk(sources[m].n_units, k) for m in range(1, len(sources))})
    lists["self"] = empty_topk(n_a, k)
    matrices = {m: np.full((n_a, sources[m].n_units), np.nan, np.float32) for m in range(1, len(sources))
                } if settings.keep_matrix else {}
    for tile in plan:
        record = records[tile.index]
        if tile.model:
            _merge_into(lists, f"row{tile.model}", tile.a_ids, _topk_from_json(record["rows"]), k)
            _merge_into(lists, f"col{tile.model}", tile.b_ids, _topk_from_json(record["cols"]), k)
            if settings.keep_matrix:
                matrices[tile.model][np.ix_(tile.a_ids, tile.b_ids)] = np.asarray(record["corr"], np.float32)
        else:
            _merge_into(lists, "self", tile.a_ids, _topk_from_json(record["rows"]), k)
    return {"lists": lists, "matrices": matrices}


def _pair_corr(values: torch.Tensor, index: torch.Tensor, pairs: torch.Tensor) -> np.ndarray:
    if pairs.shape[0] == 0:
        return np.zeros(0)
    hit = index[pairs[:, 0]] == pairs[:, 1:2]
    return values[pairs[:, 0]][hit].numpy().astype(np.float64)


def _clean(values: torch.Tensor, index: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    v = values.numpy().copy()
    v[index.numpy() < 0] = np.nan
    return v, index.numpy().copy()


def match_models(sources: list[Source], merged: dict[str, Any], settings: RosettaSettings) -> dict[str, np.ndarray]:
    """Best buddies per model, Eq. 4.4 tuples, the strongest buddy per model."""
    lists, out = merged["lists"], {}
    n_models = len(sources) - 1
    pairs_per_model, corr_of = [], []
    for m in range(1, n_models + 1):
        rv, ri = lists[f"row{m}"]
        cv, ci = lists[f"col{m}"]
        pairs = buddies_from_topk(ri, ci, settings.k, settings.bb_rule)
        corr = _pair_corr(rv, ri, pairs)
        label = model_label(m)
        out[f"pairs/{label}/row_top_corr"], out[f"pairs/{label}/row_top_index"] = _clean(rv, ri)
        out[f"pairs/{label}/col_top_corr"], out[f"pairs/{label}/col_top_index"] = _clean(cv, ci)
        out[f"pairs/{label}/buddies"] = pairs.numpy().astype(np.int64).reshape(-1, 2)
        out[f"pairs/{label}/buddy_corr"] = corr
        if settings.keep_matrix:
            out[f"pairs/{label}/corr"] = merged["matrices"][m]
        pairs_per_model.append(pairs)
        corr_of.append({(int(i), int(j)): float(r) for (i, j), r in zip(pairs.tolist(), corr)})
    members = rosetta_units(pairs_per_model).numpy().astype(np.int64).reshape(-1, n_models + 1)
    out["tuples/members"] = members
    out["tuples/corr"] = np.asarray([[corr_of[m][(int(t[0]), int(t[m + 1]))] for m in range(n_models)]
                                     for t in members], np.float64).reshape(-1, n_models)
    best_unit = np.full((sources[0].n_units, n_models), -1, np.int64)
    best_corr = np.full((sources[0].n_units, n_models), np.nan)
    for m in range(n_models):
        for (i, j), r in sorted(corr_of[m].items()):
            if best_unit[i, m] < 0 or r > best_corr[i, m]:
                best_unit[i, m], best_corr[i, m] = j, r
    out["best/unit"], out["best/corr"] = best_unit, best_corr
    return out


def match_self(self_lists: tuple[torch.Tensor, torch.Tensor], members: np.ndarray,
               settings: RosettaSettings) -> dict[str, np.ndarray]:
    """Self best buddies among the tuples' anchor units (their rows are the only ones computed: a pair needs
    both rows) and the concept of every tuple (connected components, `kernels.rosetta.cluster_units`)."""
    sv, si = self_lists
    pairs = buddies_from_topk(si, si, settings.self_k, "symmetric")
    pairs = pairs[pairs[:, 0] < pairs[:, 1]] if pairs.shape[0] else pairs
    tuples = torch.from_numpy(members)
    concept = cluster_units(tuples, pairs) if tuples.shape[0] else torch.zeros(0, dtype=torch.long)
    return {"self/buddies": pairs.numpy().astype(np.int64).reshape(-1, 2),
            "self/buddy_corr": _pair_corr(sv, si, pairs), "tuples/concept": concept.numpy().astype(np.int64)}


def dictionary(executor: Executor, work: tiles.TileWork, sources: list[Source], matched: dict[str, np.ndarray],
               blocks: list[np.ndarray], examples: int) -> dict[str, np.ndarray]:
    """Top `examples` rows per concept by the mean over its pairs of mean_x ĝ·d̂ (ties → lower row)."""
    members, concept = matched["tuples/members"], matched["tuples/concept"]
    n_concepts = int(concept.max()) + 1 if concept.size else 0
    rows_out = np.full((n_concepts, examples), -1, np.int64)
    scores_out = np.full((n_concepts, examples), np.nan)
    if not n_concepts:
        return {"dictionary/example_rows": rows_out, "dictionary/example_scores": scores_out}
    pairs = sorted({(m, int(t[0]), int(t[m]), int(c)) for t, c in zip(members, concept)
                    for m in range(1, members.shape[1])})
    size_a = {u: (int(h), int(w)) for u, h, w in zip(range(sources[0].n_units), *_hw(sources[0]))}
    grouped: dict[tuple, list] = {}
    for m, i, j, c in pairs:
        hw_b = _hw(sources[m])
        grouped.setdefault((m, size_a[i], (int(hw_b[0][j]), int(hw_b[1][j]))), []).append((i, j, c))
    groups = tuple(tiles.PairGroup(m, np.asarray([p[0] for p in g]), np.asarray([p[1] for p in g]),
                                   np.asarray([p[2] for p in g])) for (m, _, _), g in grouped.items())
    counts = np.bincount([c for _, _, _, c in pairs], minlength=n_concepts).astype(np.float64)
    parts = executor.fan_out(functools.partial(tiles.dictionary_block, work, groups, n_concepts), blocks,
                             desc="rosetta dictionary", unit="blocks")
    scores = np.concatenate(parts) / counts[None, :]
    rows = np.concatenate(blocks)
    for c in range(n_concepts):
        order = np.lexsort((rows, -scores[:, c]))[:examples]
        rows_out[c, :len(order)], scores_out[c, :len(order)] = rows[order], scores[order, c]
    return {"dictionary/example_rows": rows_out, "dictionary/example_scores": scores_out}


def _hw(source: Source) -> tuple[np.ndarray, np.ndarray]:
    table = source.unit_table()
    return table["height"], table["width"]


def run(store: RunStore, settings: RosettaSettings, executor: Executor | None = None, *,
        on_tile: Callable[[tiles.Tile, bool], None] | None = None) -> Result:
    """Rosetta of the anchor `store` with `settings.others`; results under reductions/rosetta/{name}.

    `on_tile(tile, reused)` is called once per tile (reused: read back from its done marker)."""
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ParameterError("device", "cuda was asked for, but torch sees no CUDA device")
    stores, sources = open_inputs(store, settings)
    if executor is None:
        with open_executor(None, None) as opened:
            return _run(stores, sources, settings, opened, on_tile)
    return _run(stores, sources, settings, executor, on_tile)


def _run(stores, sources, settings, executor, on_tile) -> Result:
    store = stores[0]
    with begin_reduction(store, "rosetta", {**settings.statistics_record(), "others": list(settings.others),
                                             "k": settings.k, "self_k": settings.self_k,
                                             "bb_rule": settings.bb_rule, "examples": settings.examples},
                         force=settings.force) as reduction:
        if reduction.is_current(result_group(settings.name, "summary")):
            return Result.read(store, settings)
        tiles.forget_stores()  # stores rewritten at the same URL since an earlier run in this process
        valid = common_valid(stores)
        blocks = _blocks(valid, settings, store.rows_per_chunk)
        moments = unit_moments(executor, sources, blocks, settings.score)
        work = tiles.TileWork(sources[0], tuple(sources), tuple(m for m, _ in moments), tuple(s for _, s in moments),
                              tuple(blocks), settings.score, settings.unit_block, settings.matmul_dtype,
                              settings.device)
        plan = plan_tiles(sources, settings.tile)
        digest = _digest(store, settings, sources)
        records = compute_tiles(executor, store, settings, work, plan, digest, on_tile)
        matched = match_models(sources, merge_tiles(sources, plan, records, settings), settings)
        rows = np.unique(matched["tuples/members"][:, 0])
        self_plan = plan_self_tiles(sources, rows, settings.tile, len(plan))
        self_digest = hashlib.sha256((digest + rows.tobytes().hex()).encode()).hexdigest()[:16]
        self_records = compute_tiles(executor, store, settings, work, self_plan, self_digest, on_tile)
        merged_self = merge_tiles(sources, self_plan, self_records, settings)
        matched.update(match_self(merged_self["lists"]["self"], matched["tuples/members"], settings))
        pearson_blocks = row_blocks(valid, store.rows_per_chunk * settings.chunks_per_block)
        matched.update(dictionary(executor, work, sources, matched, pearson_blocks, settings.examples))
        matched.update(unit_arrays(sources, moments))
        result = Result(settings, dict(sorted(matched.items())), result_attrs(sources, settings, int(valid.sum())))
        result.write(reduction)
        # The result is whole: the tiles' done markers have served (a rerun is a no-op now, --force recomputes).
        forget_tiles(store, settings.name)
    return result


def unit_arrays(sources: list[Source], moments) -> dict[str, np.ndarray]:
    """units/{model}/… (unit id → layer, channel, native size, mean, std) and summary/n_units."""
    out: dict[str, np.ndarray] = {}
    for m, (source, (mean, std)) in enumerate(zip(sources, moments)):
        for key, value in source.unit_table().items():
            out[f"units/{model_label(m)}/{key}"] = value
        out[f"units/{model_label(m)}/mean"], out[f"units/{model_label(m)}/std"] = mean, std
    out["summary/n_units"] = np.asarray([s.n_units for s in sources], np.int64)
    return out


def result_attrs(sources: list[Source], settings: RosettaSettings, n_images: int) -> dict[str, Any]:
    score = ("Pearson r over images × positions after bilinear resize to the pair's larger grid"
             if settings.score == "pearson" else
             "reference: per-batch cosine of (a−μ)/(σ+1e-5) maps, averaged over batches (not a Pearson r)")
    return {"k": settings.k, "self_k": settings.self_k, "k_keep": settings.k_keep, "bb_rule": settings.bb_rule,
            "score": settings.score, "score_definition": score, "n_images": n_images, "tile": settings.tile,
            "matmul_dtype": settings.matmul_dtype, "models": [model_label(m) for m in range(len(sources))],
            "inputs": [{"url": s.url, "model": s.identity, "layers": [layer.name for layer in s.layers],
                        "geometry": s.geometry} for s in sources]}


def forget_tiles(store: RunStore, name: str) -> None:
    """Remove the done markers of result `name`'s tiles (and their manifest folder)."""
    from clipscope.storage.manifest import MANIFEST_DIR

    stage = f"rosetta-{name}"
    for index in store.shard_records(stage=stage):
        store.clear_shard(index, stage=stage)
    folder = store.location.path(MANIFEST_DIR, stage)
    if store.location.fs.exists(folder):
        store.location.fs.rm(folder, recursive=True)
