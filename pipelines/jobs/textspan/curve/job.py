"""How much of the model's zero-shot accuracy the TextSpan texts carry (thesis §2.4, Fig. 2.3).

For every m in `basis_sizes` the image representation is rebuilt as
    Σ_{(l,h) chosen} Proj_{T_m(l,h)} c_head^{l,h}  +  mean over images of every other direct term
and scored zero-shot. T_m(l,h) is the span of the *original* unit text embeddings of the head's first
m TextSpan picks — the thesis's "projection to the text representations" — not of the projected,
residualised vectors the greedy search worked with (the reference code's reconstruction). The
projection is orthogonal and uncentred (Proj c, not mean + Proj(c − mean)), as the thesis writes it.

Which contributions: if TextSpan ran on normalised terms (c / ‖image embedding‖, the default), the
curve works on normalised terms too, so "every other term" is mean-ablated by the mean of the
normalised terms, as in the reference code where every stored term is normalised. For the projected
heads the choice does not matter: the projection is linear, so Proj(c / s) = Proj(c) / s, and
zero-shot arg-max is blind to one positive factor per image. "Every other term" (embedding, MLPs,
unchosen heads, biases) is taken as image_embedding − Σ chosen heads, which equals their sum exactly
by the store's identity, so it works whichever layers' heads the store holds.

Two reference points come with the curve: the unablated model (`baseline`) and the chosen heads
kept whole with everything else mean-ablated (`heads_kept`: the m → full-rank limit of the curve).

Two streamed passes over row blocks (picklable map functions, fixed-tree reduce, so Ray and local
runs count the same): the means, then per block the correct predictions for every m.
Results: `reductions/textspan/curve/<task>/{accuracy,basis_size}[basis_size]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from clipscope.kernels.zero_shot import count_correct
from clipscope.errors import ConfigError
from clipscope.pipelines.models.loading import LoadedModel
from clipscope.cluster.executor import Executor
from clipscope.pipelines.jobs.means.job import _add_sums, head_positions, reduce_rows, row_blocks
from clipscope.pipelines.jobs.textspan.curve.result import Result, resolve
from clipscope.pipelines.jobs.textspan.curve.settings import Settings
from clipscope.pipelines.texts.embedding_cache import cached_text_embeddings, embeddings_key
from clipscope.pipelines.texts.zero_shot import classifier, get_task, store_classes
from clipscope.storage import schema
from clipscope.storage.results import begin_reduction
from clipscope.storage.store import RunStore


@dataclass(frozen=True)
class _StoredPicks:
    indices: np.ndarray  # [layer head pick]
    texts_key: str
    normalize: bool
    pool: str


def stored_picks(store: RunStore, layers: Sequence[int], needed: int) -> _StoredPicks:
    """The TextSpan picks of every head of `layers`, checked to come from one search with ≥ `needed` picks."""
    indices, settings = [], set()
    for layer in layers:
        name = f"{schema.TEXTSPAN.path(layer=layer)}/indices"
        if name not in store.array_names():
            raise ConfigError(f"{store.url} has no TextSpan results for layer {layer}; run `clipscope textspan` first")
        picks = store.read_result(name)
        if picks.shape[1] < needed:
            raise ConfigError(f"{name} holds {picks.shape[1]} picks per head but the curve needs {needed}; rerun "
                              f"textspan with --basis-size {needed} (TextSpan caps it at min(span rank, images, "
                              "embed dim, pool size))")
        attrs = store.array(name).attrs
        settings.add((attrs["texts_key"], bool(attrs["normalize"]), attrs["pool"]))
        indices.append(picks[:, :needed].astype(np.int64))
    if len(settings) != 1:
        raise ConfigError(f"layers {list(layers)} were searched with different pools or normalisation; "
                          "rerun textspan on them together")
    texts_key, normalize, pool = settings.pop()
    return _StoredPicks(np.stack(indices), texts_key, normalize, pool)


def _pool_embeddings(store: RunStore, picks: _StoredPicks, texts: Sequence[str] | None,
                     loaded: LoadedModel | None) -> np.ndarray:
    if texts is not None:
        if embeddings_key(texts, store.info.model.to_dict()) != picks.texts_key:
            raise ConfigError(f"the TextSpan results were searched with another text pool (stored: {picks.pool!r}); "
                              "pass the pool TextSpan ran on")
        return cached_text_embeddings(store, texts, loaded=loaded)
    name = schema.TEXT_EMBEDDINGS.path(key=picks.texts_key)
    if name not in store.array_names():
        raise ConfigError(f"the embeddings of the TextSpan pool {picks.pool!r} are not cached in {store.url}; "
                          "pass its texts (--pool)")
    return store.read_result(name)


def pick_directions(embeddings: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """[layer head pick embed] orthonormal rows whose first m span the first m picked texts, for every m.

    Householder QR of the picked embeddings in pick order. The picks are linearly independent (their
    projections onto the span of C are, since TextSpan never picks a text without a new direction),
    so no column of R vanishes.
    """
    texts = embeddings.astype(np.float64)[indices]  # [layer head pick embed]
    q, _ = np.linalg.qr(np.swapaxes(texts, -1, -2))  # [layer head embed pick]
    return np.swapaxes(q, -1, -2)


def _read_block(store: RunStore, rows: slice, positions: tuple[int, ...], keep: np.ndarray, normalize: bool):
    embedding = store.read(schema.IMAGE_EMBEDDING.path(), rows)[keep].astype(np.float64)
    heads = store.array(schema.DIRECT_HEADS.path()).oindex[rows, list(positions)][keep].astype(np.float64)
    if normalize:
        scale = np.maximum(np.linalg.norm(embedding, axis=-1), 1e-12)
        embedding = embedding / scale[:, None]
        heads = heads / scale[:, None, None, None]
    return embedding, heads


def _hits(embedding: np.ndarray, weights: np.ndarray, truth: np.ndarray) -> int:
    return int(count_correct(torch.from_numpy(embedding), torch.from_numpy(weights), torch.from_numpy(truth)))


@dataclass(frozen=True)
class _TermSums:
    """Picklable map function: Σ over a block's valid rows of the (normalised) embedding and chosen heads."""

    store: RunStore
    positions: tuple[int, ...]
    normalize: bool

    def __call__(self, rows: slice) -> dict[str, Any]:
        valid = self.store.read_valid(rows)
        embedding, heads = _read_block(self.store, rows, self.positions, valid, self.normalize)
        return {"count": int(valid.sum()), "embedding": embedding.sum(0), "heads": heads.sum(0)}


@dataclass(frozen=True)
class _CurveCounts:
    """Picklable map function: correct zero-shot predictions of one block, for every reconstruction."""

    store: RunStore
    positions: tuple[int, ...]
    normalize: bool
    directions: np.ndarray  # [layer head pick embed]
    sizes: tuple[int, ...]
    ablated: np.ndarray  # [embed] mean of every term except the chosen heads
    weights: np.ndarray  # [embed class]
    classes: np.ndarray  # [sample] class, −1 for rows not scored

    def __call__(self, rows: slice) -> dict[str, Any]:
        truth = self.classes[rows]
        keep = truth >= 0
        truth = truth[keep]
        embedding, heads = _read_block(self.store, rows, self.positions, keep, self.normalize)
        coeff = np.einsum("blhd,lhkd->blhk", heads, self.directions, optimize=True)
        projected, counts, start = np.broadcast_to(self.ablated, embedding.shape).copy(), [], 0
        for m in self.sizes:  # picks (start, m] add to the previous size's reconstruction
            projected += np.einsum("blhk,lhkd->bd", coeff[..., start:m], self.directions[:, :, start:m],
                                   optimize=True)
            counts.append(_hits(projected, self.weights, truth))
            start = m
        kept = self.ablated + heads.sum((1, 2))
        return {"labelled": int(keep.sum()), "baseline": _hits(embedding, self.weights, truth),
                "heads_kept": _hits(kept, self.weights, truth), "projected": np.array(counts, np.int64)}


def run(store: RunStore, settings: Settings, executor: Executor | None = None, *,
        loaded: LoadedModel | None = None) -> Result:
    """Zero-shot accuracy with the heads of the settings' layers projected onto their first m TextSpan texts.

    Needs the textspan job on those layers with basis_size ≥ max(basis_sizes). The settings' `texts` (the
    pool TextSpan ran on) are needed only if its embeddings are not cached in the store; `loaded` is the
    run's model (None: loaded when needed). Writes the curve into the store when it is writable.
    """
    layers, task = resolve(store, settings)
    task = get_task(task) if isinstance(task, str) else task
    sizes = settings.sizes
    with begin_reduction(store, "textspan --curve", {"task": task.name, "layers": list(layers),
                                                     "basis_sizes": list(sizes)},
                         allow_incomplete=settings.allow_incomplete) as reduction:
        picks = stored_picks(store, layers, sizes[-1])
        directions = pick_directions(_pool_embeddings(store, picks, settings.texts, loaded), picks.indices)
        positions = tuple(head_positions(store, layers))
        weights = classifier(store, task, loaded).astype(np.float64)
        classes = store_classes(store, task)
        sums = reduce_rows(executor, store, row_blocks(store), _TermSums(store, positions, picks.normalize),
                           _add_sums, desc="curve means")
        if sums["count"] == 0:
            raise ConfigError(f"{store.url} has no valid rows to average")
        ablated = (sums["embedding"] - sums["heads"].sum((0, 1))) / sums["count"]
        counter = _CurveCounts(store, positions, picks.normalize, directions, sizes, ablated, weights, classes)
        counts = reduce_rows(executor, store, row_blocks(store, chunks_per_block=1), counter, _add_sums,
                             desc="curve scoring")
        n = counts["labelled"]
        if n == 0:
            raise ConfigError("no labelled samples to score; the zero-shot task needs the samples' labels (.cls in "
                              "the shards); leave out --curve")
        result = Result(settings, task.name, layers, sizes, counts["projected"] / n, counts["baseline"] / n,
                             counts["heads_kept"] / n, n, picks.normalize, picks.pool, picks.texts_key)
        if store.mode == "r+":
            result.write(reduction)
    return result
