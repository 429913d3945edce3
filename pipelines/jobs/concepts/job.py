"""Concept discovery (second-order paper App. A.5): the texts of the neurons active in an image.

For every valid row I of the store and the neurons n of one layer:
    ν_n(I) = ‖φ_n(I) − φ̄_n‖                     (Gram form, `kernels.neuron_pca.gram_norms`: φ never formed)
    𝒩(I)   = {n : ν_n(I) > τ_n}                  τ_n = the `rank`-th largest ν_n over the store (`topk_norms`,
                                                 the reference's 100th of ~5k images) or `norm_p98`
    w_j(I) = Σ_{n∈𝒩(I)} γ_j^n ν_n(I)            γ: the m-atom OMP coefficients of r_n (signed)
and the `top` texts of largest w_j(I) among the texts some active neuron uses (ties: lower text index).

Inputs: q, D (and s under `split`) of `extract --second-order-layers`; q̄, s̄, `topk_norms`, `norm_p98` of
`clipscope second-order` (the same means the thresholds were measured with); `support`, `coefs` of
`clipscope neurons` (checked to come from the current PCs). Rows are streamed in blocks through the
executor (per-row results, concatenated in block order). `image_concepts` answers one row without a
reduction (the `query … concepts` command).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clipscope.cluster.executor import Executor
from clipscope.errors import ConfigError, ParameterError, StoreError
from clipscope.kernels.concepts import concept_weights, text_scores, top_ranked
from clipscope.kernels.neuron_pca import NeuronFactors, gram_norms, neuron_factors
from clipscope.pipelines.jobs.concepts.result import Result
from clipscope.pipelines.jobs.concepts.settings import Settings
from clipscope.pipelines.jobs.means.job import reduce_rows, row_blocks
from clipscope.pipelines.texts.embedding_cache import stored_texts
from clipscope.storage import schema
from clipscope.storage.results import RESULT_ATTR, begin_reduction, settings_digest
from clipscope.storage.store import RunStore

logger = logging.getLogger(__name__)


def _tensor(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # arrays a Ray task receives are read-only; nothing writes to them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


@dataclass(frozen=True)
class ConceptModel:
    """Everything a block needs besides its rows (picklable, float64 numpy, neuron-major)."""

    weights: str  # store name of q
    shared: str | None  # store name of s (split convention)
    basis: np.ndarray  # [neuron embed rank]: D_nᵀ = basis_n coords_n
    coords: np.ndarray  # [neuron rank weight]
    q_mean: np.ndarray  # [neuron weight]
    shared_mean: np.ndarray | None  # [embed]
    thresholds: np.ndarray  # [neuron] τ_n
    support: np.ndarray  # [neuron pick] int64
    coefs: np.ndarray  # [neuron pick] float64, the chosen m
    n_texts: int
    top: int
    neuron_chunk: int

    def norms(self, q: np.ndarray, shared: np.ndarray | None) -> torch.Tensor:
        """ν [sample neuron] from raw q [sample later_layer head neuron] and s [sample embed]."""
        b, n_later, n_heads, n = q.shape
        dq = _tensor(np.ascontiguousarray(q.reshape(b, n_later * n_heads, n).transpose(0, 2, 1), np.float64))
        dq = dq - _tensor(self.q_mean)
        ds = None if shared is None else _tensor(shared.astype(np.float64)) - _tensor(self.shared_mean)
        parts = []
        for start in range(0, n, self.neuron_chunk):
            chunk = slice(start, min(start + self.neuron_chunk, n))
            factors = NeuronFactors(_tensor(self.basis[chunk]), _tensor(self.coords[chunk]))
            parts.append(gram_norms(dq[:, chunk], factors=factors, shared=ds).sqrt())
        return torch.cat(parts, dim=1)

    def concepts(self, q: np.ndarray, shared: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(text_index [sample top], score [sample top], n_active [sample]) of raw rows."""
        weights, active = concept_weights(self.norms(q, shared), _tensor(self.thresholds))
        support, coefs = _tensor(self.support), _tensor(self.coefs)
        scores = text_scores(weights, support, coefs, self.n_texts)
        used = text_scores(active.to(torch.float64), support, (coefs != 0).to(torch.float64), self.n_texts) > 0
        ranked = top_ranked(torch.where(used, scores, -torch.inf), self.top)
        found = torch.isfinite(ranked.values)
        index = torch.where(found, ranked.indices, -1).numpy().astype(np.int64)
        value = torch.where(found, ranked.values, torch.nan).numpy()
        return index, value, active.sum(1).numpy().astype(np.int64)


def _second_order_results(store: RunStore, layer: int) -> dict[str, np.ndarray]:
    group = schema.SECOND_ORDER.path(layer=layer)
    names = set(store.array_names())
    if store.result_group_attrs(group) is None or f"{group}/topk_norms" not in names:
        raise StoreError(f"{store.url} has no second-order results for layer {layer}; run "
                         f"`clipscope second-order {store.url} --layer {layer}` first")
    leaves = ("mean_weights", "mean_shared", "topk_norms", "norm_p98", "pc")
    return {leaf: store.read_result(f"{group}/{leaf}") for leaf in leaves if f"{group}/{leaf}" in names}


def pcs_digest(pcs: np.ndarray) -> str:
    """The digest the neurons job records of the PCs it decomposed (`pc_sha256`)."""
    return hashlib.sha256(np.ascontiguousarray(pcs, np.float64).tobytes()).hexdigest()[:16]


def default_m(stored: list[int], embed: int | None) -> int:
    """The sparsity read when none is asked for: the largest stored m ≤ embed / 4 (the paper's 128 in a
    512-dimensional embedding; the same 128 for ViT-L's 768), else the smallest stored; the largest stored
    when the embedding dimension is unknown. From m = embed on, OMP reproduces a PC with any m texts."""
    if embed is None:
        return max(stored)
    sparse = [m for m in stored if m <= embed // 4]
    return max(sparse) if sparse else min(stored)


def read_decomposition(store: RunStore, layer: int, m: int | None,
                       pcs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int, dict[str, Any]]:
    """(support [neuron pick], coefs [neuron pick] of the m-atom solution, m, the OMP group's attrs) of
    `layer`; with `pcs`, checked to be their decomposition. m None: `default_m` of the stored sparsities."""
    group = schema.OMP.path(layer=layer)
    if f"{group}/support" not in store.array_names():
        raise StoreError(f"{store.url} has no {group}; run `clipscope neurons {store.url} --layer {layer}` first")
    attrs = dict(store.array(f"{group}/support").attrs)
    if pcs is not None and attrs.get("pc_sha256") != pcs_digest(pcs):
        raise StoreError(f"the PCs of layer {layer} changed since its OMP ran; rerun "
                         f"`clipscope neurons {store.url} --layer {layer}`")
    stored = [int(v) for v in store.read_result(f"{group}/m")]
    embed = int(pcs.shape[1]) if pcs is not None else None
    chosen = default_m(stored, embed) if m is None else m
    if chosen not in stored:
        raise ParameterError("m", f"must be one of the sparsities the OMP of layer {layer} stored {stored}, got {m}")
    if embed is not None and chosen >= embed:
        logger.warning("m = %d ≥ the %d embedding dimensions of layer %d's PCs: OMP then fits every PC exactly with "
                       "any %d texts, and γ names nothing; use m ≤ %d (the paper: 128 of 512)", chosen, embed, layer,
                       embed, embed // 4)
    coefs = store.read_result(f"{group}/coefs")[stored.index(chosen)].astype(np.float64)
    return store.read_result(f"{group}/support").astype(np.int64), coefs, chosen, attrs


def thresholds(stats: dict[str, np.ndarray], settings: Settings) -> tuple[np.ndarray, int | None]:
    """(τ [neuron], the rank used: None for p98)."""
    if settings.threshold == "p98":
        return stats["norm_p98"].astype(np.float64), None
    top = stats["topk_norms"]
    rank = settings.rank or top.shape[1]
    if rank > top.shape[1]:
        raise ParameterError("rank", f"must be ≤ the top-k the second-order job kept ({top.shape[1]}), got {rank}")
    tau = top[:, rank - 1].astype(np.float64)
    if np.isnan(tau).any():
        raise ParameterError("rank", f"must be ≤ the number of images of the store, got {rank}")
    return tau, rank


def concept_model(store: RunStore, settings: Settings) -> tuple[ConceptModel, dict[str, Any]]:
    """The block model of `settings` and the result's attrs."""
    layer = settings.layer
    weights = schema.SECOND_ORDER_WEIGHTS.path(layer=layer)
    if weights not in store.array_names():
        raise ConfigError(f"layer {layer} has no second-order arrays in {store.url}; they are made by "
                          f"`clipscope extract … --second-order-layers {layer}`")
    shared = schema.SECOND_ORDER_SHARED.path(layer=layer)
    stats = _second_order_results(store, layer)
    support, coefs, m, omp_attrs = read_decomposition(store, layer, settings.m, stats["pc"])
    directions = store.read_result(schema.SECOND_ORDER_DIRECTIONS.path(layer=layer)).astype(np.float64)
    n_later, n_heads, n, e = directions.shape
    factors = neuron_factors(torch.from_numpy(np.ascontiguousarray(
        directions.reshape(n_later * n_heads, n, e).transpose(1, 0, 2))))
    q_mean = np.ascontiguousarray(stats["mean_weights"].reshape(n_later * n_heads, n).T, np.float64)
    has_shared = "mean_shared" in stats
    if has_shared and shared not in store.array_names():
        raise StoreError(f"{store.url} lacks {shared} that its second-order means were computed with; re-extract")
    tau, rank = thresholds(stats, settings)
    model = ConceptModel(weights, shared if has_shared else None, factors.basis.numpy(), factors.coords.numpy(),
                         q_mean, stats.get("mean_shared"), tau, support, coefs, int(omp_attrs["n_texts"]),
                         settings.top, settings.neuron_chunk)
    attrs = {"layer": layer, "m": m, "threshold": settings.threshold, "rank": rank, "top": settings.top,
             "pool": omp_attrs["pool"], "texts_key": omp_attrs["texts_key"], "n_neurons": int(n),
             "count": int(store.read_valid().sum())}
    return model, attrs


@dataclass(frozen=True)
class _ConceptBlock:
    """Picklable map function: the concepts of one block's valid rows."""

    store: RunStore
    model: ConceptModel

    def __call__(self, rows: slice) -> tuple[np.ndarray, ...]:
        valid = self.store.read_valid(rows)
        q = self.store.read(self.model.weights, rows)[valid]
        shared = None if self.model.shared is None else self.store.read(self.model.shared, rows)[valid]
        return (np.arange(rows.start, rows.stop)[valid], *self.model.concepts(q, shared))


def _concat(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    return tuple(np.concatenate([x, y]) for x, y in zip(a, b))


def _record(store: RunStore, settings: Settings) -> dict[str, Any]:
    upstream = {}
    for name, group in (("second_order", schema.SECOND_ORDER.path(layer=settings.layer)),
                        ("omp", schema.OMP.path(layer=settings.layer))):
        upstream[name] = settings_digest((store.result_group_attrs(group) or {}).get(RESULT_ATTR))
    return {"layer": settings.layer, "m": settings.m, "threshold": settings.threshold, "rank": settings.rank,
            "top": settings.top, "upstream": upstream}


def run(store: RunStore, settings: Settings, executor: Executor | None = None) -> Result:
    """The concepts of every valid row of the store, written to `reductions/concepts/layer_{l}` whole (a
    rerun with the same settings on the same extraction and upstream results reads them back)."""
    model, attrs = concept_model(store, settings)  # missing inputs fail before the lock is taken
    with begin_reduction(store, "concepts", _record(store, settings), allow_incomplete=settings.allow_incomplete,
                         force=settings.force) as reduction:
        if reduction.is_current(schema.CONCEPTS.path(layer=settings.layer)):
            return Result.read(store, settings)
        blocks = row_blocks(store, settings.chunks_per_block)
        rows, index, score, active = reduce_rows(executor, store, blocks, _ConceptBlock(store, model), _concat,
                                                 desc="concepts")
        text_index = np.full((store.n_rows, settings.top), -1, np.int64)
        scores = np.full((store.n_rows, settings.top), np.nan, np.float64)
        n_active = np.full(store.n_rows, -1, np.int64)
        width = index.shape[1] if index.ndim == 2 else 0
        text_index[rows, :width], scores[rows, :width], n_active[rows] = index, score, active
        result = Result(settings, text_index, scores, n_active, attrs)
        if store.mode == "r+":
            result.write(reduction)
    return result


@dataclass(frozen=True)
class ImageConcepts:
    """The concepts of one row: texts and scores, best first, and how many neurons were active."""

    row: int
    texts: list[str]
    text_index: np.ndarray
    score: np.ndarray
    n_active: int
    n_neurons: int


def image_concepts(store: RunStore, row: int, settings: Settings) -> ImageConcepts:
    """The concepts of store row `row` (read-only: nothing is written)."""
    if not bool(store.read_valid(slice(row, row + 1))[0]):
        raise ConfigError(f"row {row} of {store.url} holds no valid image")
    model, attrs = concept_model(store, settings)
    q = store.read(model.weights, slice(row, row + 1))
    shared = None if model.shared is None else store.read(model.shared, slice(row, row + 1))
    index, score, active = model.concepts(q, shared)
    texts = stored_texts(store, attrs["texts_key"])
    keep = index[0] >= 0
    return ImageConcepts(row, [texts[i] for i in index[0][keep]], index[0][keep], score[0][keep], int(active[0]),
                         attrs["n_neurons"])
