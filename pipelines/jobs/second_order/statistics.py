"""Second-order effects of one MLP layer's neurons, reduced from a store (second-order paper §3.3).

Inputs (written by `extract --second-order-layers`): q = `second_order/layer_{l}/weights`
[sample, later_layer, head, neuron], D = `…/directions` [later_layer, head, neuron, embed] and, under
the `split` convention, s = `…/shared` [sample, embed], so that φ_n(I) = D_nᵀ q_n(I) + s(I)
(`kernels.decompose.second_order_effects`). φ is never materialised: norms use the thin-QR (Gram)
form of `kernels.neuron_pca`, the PC an SVD in q-space.

Passes over the store's row blocks (Ray tasks with a fixed-tree reduce, or in process — same tree,
same result):
1. the means q̄, s̄ over valid rows (reused from `reductions/means` when their count is current);
2. per neuron the centred norms ν_n(I) = ‖φ_n(I) − φ̄_n‖: streaming top-k rows (ties: lower row),
   Σν, Σν² and a log-spaced histogram;
3. the q of every neuron's top-k rows, gathered by row index (s by row index directly);
then the rank-1 PC per neuron from its top-k centred effects (reference semantics: first right
singular vector, sign so most projections are positive; Ray tasks over neuron chunks).

Sparsity statistics — exact and streamable. The paper's "significant for less than 2% of the
images" is an ablation over each neuron's 100 largest-norm images out of ~5000 (its top 2%):
* energy_topk[n] = Σ_{I∈top_n} ν_n(I)² / Σ_I ν_n(I)²: the share of the neuron's centred energy its
  k largest-norm images carry (attr `topk_fraction` = k / count; 100 of 5000 is the paper's 2%).
* norm_histogram[n, bin]: counts of ν_n over the edges `norm_bin_edges` = 2^(j/8), j = −320…192;
  bin 0 = [0, edge 0), bin b = [edge b−1, edge b), the last bin = [last edge, ∞).
* norm_p98[n]: the 98th percentile of ν_n (the ⌈0.98·count⌉-th smallest value) rounded up to the
  histogram grid — the upper edge of its bin, at most 2^(1/8) ≈ 9% above the exact value (inf in
  the last bin).
* significant_share[n]: the share of images with ν_n ≥ t, where t (attr `significance_threshold`)
  is the 98th percentile of all (image, neuron) norms of the layer rounded up to the grid the same
  way. t is a bin edge, so the share is exact; its mean over neurons is ≤ 2% by construction, its
  spread shows whether single neurons are significant on more images than that.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clipscope.errors import ConfigError, StoreError
from clipscope.kernels.neuron_pca import (
    NeuronFactors,
    TopK,
    gram_norms,
    neuron_factors,
    rank1_pc,
    topk_init,
    topk_merge,
    topk_update,
)
from clipscope.cluster.executor import Executor, LocalExecutor
from clipscope.pipelines.jobs.means.job import current_means, reduce_rows, row_blocks
from clipscope.params import Interval, check_parameter
from clipscope.pipelines.jobs.second_order.settings import SecondOrderSettings
from clipscope.storage import schema
from clipscope.storage.store import RunStore

BINS_PER_OCTAVE = 8
OCTAVES = (-40, 24)  # ν below 2^-40 or above 2^24 lands in the first or last bin
SIGNIFICANCE_PERCENT = 98

def norm_bin_edges() -> np.ndarray:
    lo, hi = OCTAVES
    return 2.0 ** (np.arange(lo * BINS_PER_OCTAVE, hi * BINS_PER_OCTAVE + 1) / BINS_PER_OCTAVE)


def result_prefix(layer: int) -> str:
    return schema.SECOND_ORDER.path(layer=layer)


@dataclass(frozen=True)
class LayerArrays:
    """Store names of one second-order layer's inputs; `shared` is None under the `center` convention."""

    layer: int
    weights: str
    directions: str
    shared: str | None


def second_order_layers(store: RunStore) -> list[int]:
    found = []
    for name in store.array_names():
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "second_order" and parts[2] == "weights":
            found.append(int(parts[1].removeprefix("layer_")))
    return sorted(found)


def layer_arrays(store: RunStore, layer: int) -> LayerArrays:
    check_parameter("layer", layer, [Interval(int, 0)])
    weights, directions = schema.SECOND_ORDER_WEIGHTS.path(layer=layer), schema.SECOND_ORDER_DIRECTIONS.path(layer=layer)
    shared = schema.SECOND_ORDER_SHARED.path(layer=layer)
    names = set(store.array_names())
    if weights not in names or directions not in names:
        raise ConfigError(f"layer {layer} has no second-order arrays in {store.url}; "
                          f"stored second-order layers: {second_order_layers(store)}; they are made by "
                          f"`clipscope extract … --second-order-layers {layer}`")
    convention = store.info.ln_convention
    if convention == "split" and shared not in names:
        raise StoreError(f"{store.url} was extracted with the split convention but lacks {shared}; re-extract it")
    has_shared = shared in names if convention is None else convention == "split"
    return LayerArrays(layer, weights, directions, shared if has_shared else None)


def layer_means(store: RunStore, arrays: LayerArrays, *, executor: Executor | None = None) -> dict[str, Any]:
    """q̄ [later_layer head neuron] and s̄ [embed] (None under `center`) over valid rows, and the count.

    Means already in `reductions/means` are reused when written for the current number of valid
    rows; otherwise they are computed (and written, on a writable store).
    """
    names = [arrays.weights] + ([arrays.shared] if arrays.shared else [])
    count = int(store.read_valid().sum())
    if count == 0:
        raise ConfigError(f"{store.url} has no valid rows to reduce")
    means = current_means(store, names, executor=executor)
    return {"weights": means[arrays.weights], "shared": means.get(arrays.shared), "count": count}


def neuron_major(q: np.ndarray) -> Tensor:
    """q [sample, later_layer, head, neuron] → float64 [sample, neuron, weight], weight = (later_layer, head)."""
    b, n_later, n_heads, n = q.shape
    return torch.from_numpy(np.ascontiguousarray(q.reshape(b, n_later * n_heads, n).transpose(0, 2, 1),
                                                 dtype=np.float64))


def directions_neuron_major(d: np.ndarray) -> np.ndarray:
    """D [later_layer, head, neuron, embed] → float64 [neuron, weight, embed], in `neuron_major`'s order."""
    n_later, n_heads, n, e = d.shape
    return np.ascontiguousarray(d.reshape(n_later * n_heads, n, e).transpose(1, 0, 2), dtype=np.float64)


def as_tensor(array: np.ndarray | None) -> Tensor | None:
    """A tensor sharing `array`'s memory. Arrays a Ray task receives are read-only views of the object
    store; nothing here writes to them, so torch's warning about that is silenced."""
    if array is None:
        return None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def read_centred(store: RunStore, arrays: LayerArrays, rows: slice, keep: np.ndarray, q_mean: np.ndarray,
                 shared_mean: np.ndarray | None) -> tuple[Tensor, Tensor | None]:
    """Centred q [sample neuron weight] and s [sample embed] (None under `center`) of a block's kept rows."""
    dq = neuron_major(store.read(arrays.weights, rows)[keep]) - as_tensor(q_mean)
    if arrays.shared is None:
        return dq, None
    shared = torch.from_numpy(store.read(arrays.shared, rows)[keep].astype(np.float64))
    return dq, shared - as_tensor(shared_mean)


def chunk_slices(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


@dataclass(frozen=True)
class LayerModel:
    """What the map tasks need besides the rows: factors of D, means, in neuron-major float64 numpy."""

    arrays: LayerArrays
    basis: np.ndarray  # [neuron embed rank]
    coords: np.ndarray  # [neuron rank weight]
    q_mean: np.ndarray  # [neuron weight]
    shared_mean: np.ndarray | None  # [embed]

    def factors(self, neurons: slice) -> NeuronFactors:
        return NeuronFactors(as_tensor(self.basis[neurons]), as_tensor(self.coords[neurons]))


def layer_model(store: RunStore, arrays: LayerArrays, means: dict[str, Any]) -> LayerModel:
    directions = torch.from_numpy(directions_neuron_major(store.read_result(arrays.directions)))
    factors = neuron_factors(directions)
    n_later, n_heads, n = means["weights"].shape
    q_mean = np.ascontiguousarray(means["weights"].reshape(n_later * n_heads, n).T)
    return LayerModel(arrays, factors.basis.numpy(), factors.coords.numpy(), q_mean, means["shared"])


def centred_norms(model: LayerModel, dq: Tensor, ds: Tensor | None, neuron_chunk: int) -> Tensor:
    """ν [sample neuron] = ‖φ_n − φ̄_n‖ from centred q and s, a chunk of neurons at a time."""
    parts = [gram_norms(dq[:, chunk], factors=model.factors(chunk), shared=ds).sqrt()
             for chunk in chunk_slices(dq.shape[1], neuron_chunk)]
    return torch.cat(parts, dim=1)


@dataclass(frozen=True)
class NormPartial:
    """Pass-2 summary of some rows: top-k per neuron, Σν, Σν², histogram of ν."""

    top: TopK
    count: int
    norm_sum: np.ndarray  # [neuron]
    energy: np.ndarray  # [neuron]
    histogram: np.ndarray  # [neuron bin] int64


def norm_partial(norms: Tensor, rows: np.ndarray, k: int, edges: np.ndarray) -> NormPartial:
    n = norms.shape[1]
    values = norms.numpy()
    n_bins = len(edges) + 1
    bins = np.searchsorted(edges, values, side="right") + (np.arange(n) * n_bins)[None, :]
    histogram = np.bincount(bins.ravel(), minlength=n * n_bins).reshape(n, n_bins).astype(np.int64)
    return NormPartial(topk_update(topk_init(n, k), norms, torch.from_numpy(rows)), len(rows),
                       values.sum(0), (values * values).sum(0), histogram)


def merge_norm_partials(a: NormPartial, b: NormPartial) -> NormPartial:
    return NormPartial(topk_merge(a.top, b.top), a.count + b.count, a.norm_sum + b.norm_sum,
                       a.energy + b.energy, a.histogram + b.histogram)


@dataclass(frozen=True)
class _NormBlock:
    """Picklable map function of pass 2."""

    store: RunStore
    model: LayerModel
    top_k: int
    neuron_chunk: int

    def __call__(self, rows: slice) -> NormPartial:
        keep = self.store.read_valid(rows)
        m = self.model
        dq, ds = read_centred(self.store, m.arrays, rows, keep, m.q_mean, m.shared_mean)
        norms = centred_norms(m, dq, ds, self.neuron_chunk)
        return norm_partial(norms, np.arange(rows.start, rows.stop)[keep], self.top_k, norm_bin_edges())


@dataclass(frozen=True)
class _GatherBlock:
    """Picklable map function of pass 3: (slot ids, q rows [slot weight]) of the top rows in a block."""

    store: RunStore
    weights: str
    top_rows: np.ndarray  # [neuron slot]

    def __call__(self, rows: slice) -> tuple[np.ndarray, np.ndarray]:
        neuron, slot = np.nonzero((self.top_rows >= rows.start) & (self.top_rows < rows.stop))
        q = self.store.read(self.weights, rows)
        # Advanced indices around slices put their dimension first: [hit, later_layer, head].
        picked = q[self.top_rows[neuron, slot] - rows.start, :, :, neuron]
        return neuron * self.top_rows.shape[1] + slot, picked.reshape(len(neuron), -1)


def _concat(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])


@dataclass(frozen=True)
class _PCChunk:
    """One PC task: a chunk of neurons' centred top-k q, their top rows and factors."""

    dq_top: np.ndarray  # [neuron slot weight]
    top_rows: np.ndarray  # [neuron slot]
    basis: np.ndarray
    coords: np.ndarray


@dataclass(frozen=True)
class _PCSolver:
    """Picklable per-chunk PC task; holds the centred s of every top row once (not per neuron)."""

    unique_rows: np.ndarray | None  # sorted rows in any neuron's top set
    ds_rows: np.ndarray | None  # [unique_row embed]

    def __call__(self, item: _PCChunk) -> tuple[np.ndarray, np.ndarray]:
        ds_top = None
        if self.ds_rows is not None:
            ds_top = torch.from_numpy(self.ds_rows[np.searchsorted(self.unique_rows, item.top_rows)])
        result = rank1_pc(as_tensor(item.dq_top), factors=NeuronFactors(as_tensor(item.basis), as_tensor(item.coords)),
                          shared_top=ds_top)
        return result.pc.numpy(), result.explained_ratio.numpy()


def quantile_bins(histogram: np.ndarray, count: int, percent: int) -> np.ndarray:
    """Per row of `histogram` [..., bin], the bin holding the ⌈percent·count/100⌉-th smallest value."""
    rank = -(-percent * count // 100)  # integer ceiling: 0.98·count in floating point may round up
    return np.argmax(np.cumsum(histogram, axis=-1) >= max(rank, 1), axis=-1)


def upper_edges(bins: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.append(edges, np.inf)[bins]


def compute_statistics(store: RunStore, settings: SecondOrderSettings,
                       executor: Executor | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and attributes of `reductions/second_order/layer_{l}` (see the module docstring)."""
    layer = settings.layer
    executor = executor if executor is not None else LocalExecutor()
    arrays = layer_arrays(store, layer)
    means = layer_means(store, arrays, executor=executor)
    model = layer_model(store, arrays, means)
    blocks = row_blocks(store, settings.chunks_per_block)
    norms: NormPartial = reduce_rows(executor, store, blocks,
                                     _NormBlock(store, model, settings.top_k, settings.neuron_chunk),
                                     merge_norm_partials, desc="second-order norms")
    top_rows = norms.top.rows.numpy()  # [neuron slot], slot < min(k, count)
    n_neurons, n_slots = top_rows.shape

    wanted = [b for b in blocks if bool(((top_rows >= b.start) & (top_rows < b.stop)).any())]
    ids, values = reduce_rows(executor, store, wanted, _GatherBlock(store, arrays.weights, top_rows), _concat,
                              desc="second-order top rows")
    q_top = np.empty((n_neurons * n_slots, values.shape[1]), np.float64)
    q_top[ids] = values
    dq_top = q_top.reshape(n_neurons, n_slots, -1) - model.q_mean[:, None, :]
    solver = _PCSolver(None, None)
    if arrays.shared is not None:
        unique_rows = np.unique(top_rows)
        solver = _PCSolver(unique_rows, store.read(arrays.shared, unique_rows).astype(np.float64) - model.shared_mean)
    items = [_PCChunk(np.ascontiguousarray(dq_top[chunk]), top_rows[chunk], model.basis[chunk], model.coords[chunk])
             for chunk in chunk_slices(n_neurons, settings.neuron_chunk)]
    solved = executor.fan_out(solver, items, desc="second-order PCs", unit="neurons",
                              sizes=[len(item.top_rows) for item in items])

    return _assemble(layer, settings, means, norms, solved)


def _assemble(layer: int, settings: SecondOrderSettings, means: dict[str, Any], norms: NormPartial,
              solved: list[tuple[np.ndarray, np.ndarray]]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    count, k = norms.count, settings.top_k
    top_values = norms.top.values.numpy()
    n_neurons, n_slots = top_values.shape
    topk_rows = np.full((n_neurons, k), -1, np.int64)
    topk_rows[:, :n_slots] = norms.top.rows.numpy()
    topk_norms = np.full((n_neurons, k), np.nan, np.float64)
    topk_norms[:, :n_slots] = top_values
    top_energy = (top_values * top_values).sum(1)
    energy_topk = np.divide(top_energy, norms.energy, out=np.zeros(n_neurons), where=norms.energy > 0)
    edges = norm_bin_edges()
    layer_bin = int(quantile_bins(norms.histogram.sum(0), count * n_neurons, SIGNIFICANCE_PERCENT))
    threshold = float(upper_edges(np.array(layer_bin), edges))
    significant = norms.histogram[:, layer_bin + 1:].sum(1) / count
    arrays = {"mean_weights": means["weights"]}  # in the schema's order
    if means["shared"] is not None:
        arrays["mean_shared"] = means["shared"]
    arrays |= {
        "norm_mean": norms.norm_sum / count,
        "norm_max": top_values[:, 0].astype(np.float64),
        "norm_p98": upper_edges(quantile_bins(norms.histogram, count, SIGNIFICANCE_PERCENT), edges),
        "energy_topk": energy_topk,
        "significant_share": significant,
        "norm_histogram": norms.histogram,
        "norm_bin_edges": edges,
        "topk_rows": topk_rows,
        "topk_norms": topk_norms,
        "pc": np.concatenate([pc for pc, _ in solved]),
        "pc_explained": np.concatenate([ratio for _, ratio in solved]),
    }
    attrs = {"layer": layer, "count": count, "top_k": k, "topk_fraction": min(k, count) / count,
             "significance_percent": SIGNIFICANCE_PERCENT, "significance_threshold": threshold,
             "convention": "split" if means["shared"] is not None else "center"}
    return arrays, attrs
