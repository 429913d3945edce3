"""Zero-shot accuracy under mean-ablations of one layer's second-order effects (paper Fig. 3).

Reads the statistics of `job.run` (means, top-k rows, PCs) from the store and, per row
block, forms the image embeddings of `kernels.second_order_ablation.ABLATIONS` from q — one
contraction per ablation, never φ — and counts correct zero-shot predictions. The top-k images and
the means come from the same store the accuracy is measured on (the paper takes them from a
separate set of ~5000 training images).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clipscope.errors import ConfigError, StoreError
from clipscope.kernels.zero_shot import count_correct
from clipscope.kernels.second_order_ablation import ABLATIONS, ablated_embeddings, ablation_terms, add_terms
from clipscope.cluster.executor import Executor
from clipscope.pipelines.jobs.means.job import reduce_rows, row_blocks
from clipscope.pipelines.jobs.second_order.settings import SecondOrderSettings
from clipscope.pipelines.jobs.second_order.statistics import (
    LayerArrays,
    as_tensor,
    chunk_slices,
    directions_neuron_major,
    layer_arrays,
    read_centred,
    result_prefix,
)
from clipscope.storage import schema
from clipscope.storage.store import RunStore


def top_membership(top_rows: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[len(rows), neuron] bool: row i is among neuron n's top rows (`top_rows` [neuron slot], −1 padded;
    `rows` sorted)."""
    at = np.searchsorted(rows, top_rows).clip(max=max(len(rows) - 1, 0))
    hit = (rows[at] == top_rows) if len(rows) else np.zeros(top_rows.shape, bool)
    neuron, slot = np.nonzero(hit)
    member = np.zeros((len(rows), top_rows.shape[0]), bool)
    member[at[neuron, slot], neuron] = True
    return member


@dataclass(frozen=True)
class AblationBlock:
    """Picklable map function: correct predictions per ablation and the number of labelled rows."""

    store: RunStore
    arrays: LayerArrays
    directions: np.ndarray  # [neuron weight embed] float64
    pc: np.ndarray  # [neuron embed]
    q_mean: np.ndarray  # [neuron weight]
    shared_mean: np.ndarray | None
    top_rows: np.ndarray  # [neuron slot]
    weights: np.ndarray  # [embed class]
    classes: np.ndarray  # [row] class or −1
    neuron_chunk: int

    def embeddings(self, rows: slice) -> tuple[np.ndarray, torch.Tensor]:
        """The labelled rows of a block and their embeddings [ablation sample embed]."""
        keep = self.classes[rows] >= 0
        index = np.arange(rows.start, rows.stop)[keep]
        emb = torch.from_numpy(self.store.read(schema.IMAGE_EMBEDDING.path(), rows)[keep].astype(np.float64))
        dq, ds = read_centred(self.store, self.arrays, rows, keep, self.q_mean, self.shared_mean)
        in_top = torch.from_numpy(top_membership(self.top_rows, index))
        terms = None
        for chunk in chunk_slices(dq.shape[1], self.neuron_chunk):
            part = ablation_terms(dq[:, chunk], as_tensor(self.directions[chunk]), as_tensor(self.pc[chunk]),
                                  in_top[:, chunk], ds)
            terms = part if terms is None else add_terms(terms, part)
        return index, ablated_embeddings(emb, terms)

    def __call__(self, rows: slice) -> np.ndarray:
        counts = np.zeros(len(ABLATIONS) + 1, np.int64)
        index, embeddings = self.embeddings(rows)
        if len(index):
            counts[:-1] = count_correct(embeddings, as_tensor(self.weights),
                                        torch.from_numpy(self.classes[index])).numpy()
            counts[-1] = len(index)
        return counts


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


def ablation_block(store: RunStore, settings: SecondOrderSettings, weights: np.ndarray,
                   classes: np.ndarray) -> AblationBlock:
    """The map function of `ablation_accuracy`, from the layer's statistics in the store."""
    layer = settings.layer
    arrays = layer_arrays(store, layer)
    prefix = result_prefix(layer)
    if f"{prefix}/pc" not in store.array_names():
        raise StoreError(f"{store.url} has no second-order results for layer {layer}; run "
                         f"`clipscope second-order` first")
    classes = np.asarray(classes)
    if classes.shape != (store.n_rows,):
        raise ConfigError(f"classes must have shape ({store.n_rows},), got {classes.shape}")
    mean = store.read_result(f"{prefix}/mean_weights")
    n_later, n_heads, n = mean.shape
    shared_mean = store.read_result(f"{prefix}/mean_shared") if arrays.shared is not None else None
    return AblationBlock(store, arrays, directions_neuron_major(store.read_result(arrays.directions)),
                         store.read_result(f"{prefix}/pc").astype(np.float64),
                         np.ascontiguousarray(mean.reshape(n_later * n_heads, n).T), shared_mean,
                         store.read_result(f"{prefix}/topk_rows"), np.asarray(weights, np.float64), classes,
                         settings.neuron_chunk)


def ablation_accuracy(store: RunStore, settings: SecondOrderSettings, weights: np.ndarray, classes: np.ndarray,
                      executor: Executor | None = None) -> dict[str, float]:
    """Accuracy under every ablation (and the number of labelled rows, key `labelled`) for classifier
    `weights` [embed class] and `classes` [row] (−1: not scored); predictions are the arg-max of
    embedding · weights, as in `zero_shot.accuracy`. Needs the statistics of `settings.layer` in the store."""
    block = ablation_block(store, settings, weights, classes)
    counts = reduce_rows(executor, store, row_blocks(store, settings.chunks_per_block), block, _add,
                         desc="second-order evaluation")
    if counts[-1] == 0:
        raise ConfigError("no labelled samples to score; the zero-shot task needs the samples' labels (.cls in "
                          "the shards); skip the evaluation with --no-evaluation")
    table: dict[str, float] = {name: float(c) / float(counts[-1]) for name, c in zip(ABLATIONS, counts[:-1])}
    table["labelled"] = int(counts[-1])
    return table
