"""Spurious-cue mining (second-order paper §5.1, Eq. 6) and the fooling rate of generated images.

    v      = t̂(c_wrong) − t̂(c_true)                 unit text embeddings of the bare class names (run's model)
    𝒩      = the `neurons` neurons of largest |⟨v, r_n⟩| over the chosen layers (r_n: each neuron's PC)
    w_j    = Σ_{n∈𝒩} γ_j^n ⟨v, r_n⟩                   (Eq. 6; γ: the m-atom OMP coefficients of r_n)
The `words` texts of largest w_j are the cue words, after dropping c_wrong, its synonyms (texts whose unit
embedding has cosine ≥ `synonym_cosine` with t̂(c_wrong): the run's own text encoder stands in for the
reference's sentence-transformer) and a block list. `ranking="reference"` ranks single (neuron, text)
entries γ_j^n⟨v, r_n⟩ as the reference code does (top `entries`, then de-duplicated).

The reference's success rule for a generated image I is ⟨M(I), v⟩ > 0 (`fooling_rate`, streamed over the
row blocks of any extracted store of generated images).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clipscope.cluster.executor import Executor
from clipscope.errors import ConfigError, ParameterError, StoreError, literal
from clipscope.kernels.concepts import cue_direction, cue_weights, entry_ranking, text_scores, top_ranked
from clipscope.pipelines.jobs.concepts.job import read_decomposition
from clipscope.pipelines.jobs.cues.result import Result, result_key
from clipscope.pipelines.jobs.cues.settings import Settings
from clipscope.pipelines.jobs.means.job import reduce_rows, row_blocks
from clipscope.pipelines.models.loading import LoadedModel
from clipscope.pipelines.texts.embedding_cache import cached_text_embeddings, stored_texts
from clipscope.pipelines.texts.zero_shot import classifier, get_task
from clipscope.storage import schema
from clipscope.storage.results import RESULT_ATTR, begin_reduction, settings_digest
from clipscope.storage.store import RunStore


@dataclass(frozen=True)
class CueInputs:
    """The PCs and OMP decompositions of the chosen layers, flat over their neurons, and the pool."""

    pcs: np.ndarray  # [neuron embed]
    support: np.ndarray  # [neuron pick]
    coefs: np.ndarray  # [neuron pick]
    offsets: tuple[int, ...]  # first flat neuron of each layer
    texts: list[str]
    embeddings: np.ndarray  # [text embed] unit
    m: int
    attrs: dict[str, Any]


def cue_inputs(store: RunStore, layers: tuple[int, ...], m: int | None) -> CueInputs:
    pcs, supports, coefs, offsets, keys, attrs, ms = [], [], [], [], set(), {}, set()
    for layer in layers:
        name = f"{schema.SECOND_ORDER.path(layer=layer)}/pc"
        if name not in store.array_names():
            raise StoreError(f"{store.url} has no {name}; run `clipscope second-order {store.url} --layer {layer}`")
        pc = store.read_result(name).astype(np.float64)
        support, coef, chosen, attrs = read_decomposition(store, layer, m, pc)
        offsets.append(sum(len(p) for p in pcs))
        pcs.append(pc)
        supports.append(support)
        coefs.append(coef)
        keys.add(attrs["texts_key"])
        ms.add(chosen)
    if len(keys) > 1 or len(ms) > 1:
        raise ConfigError(f"the OMP decompositions of layers {list(layers)} were made over different text pools or "
                          f"sparsities; run `clipscope neurons` of each layer with the same --pool (and pass --m)")
    width = max(s.shape[1] for s in supports)
    support = np.concatenate([np.pad(s, ((0, 0), (0, width - s.shape[1])), constant_values=-1) for s in supports])
    coef = np.concatenate([np.pad(c, ((0, 0), (0, width - c.shape[1]))) for c in coefs])
    key = keys.pop()
    embeddings = store.read_result(schema.TEXT_EMBEDDINGS.path(key=key)).astype(np.float64)
    embeddings /= np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-300)
    return CueInputs(np.concatenate(pcs), support, coef, tuple(offsets), stored_texts(store, key), embeddings,
                     ms.pop(), {"pool": attrs["pool"], "texts_key": key})


def class_embeddings(store: RunStore, true: str, wrong: str, *, task: str | None = None,
                     loaded: LoadedModel | None = None) -> np.ndarray:
    """[2 embed]: the text embeddings of the bare names (cached in the store), or with `task` the task's unit
    class weights of the two classes (its templates averaged, open_clip's convention)."""
    if true == wrong:
        raise ConfigError(f"{{true}} and {{wrong}} must name two classes, got {literal(repr(true))} twice",
                          parameters=("true", "wrong"))
    if task is None:
        return cached_text_embeddings(store, [true, wrong], pool_name="cues:classes", loaded=loaded).astype(np.float64)
    zero_shot = get_task(task)
    missing = [name for name in (true, wrong) if name not in zero_shot.classnames]
    if missing:
        raise ParameterError("task", f"{task} has no class {missing[0]!r}")
    weights = classifier(store, zero_shot, loaded).astype(np.float64)
    return weights[:, [zero_shot.classnames.index(true), zero_shot.classnames.index(wrong)]].T


def cue_direction_of(store: RunStore, true: str, wrong: str, *, task: str | None = None,
                     loaded: LoadedModel | None = None) -> np.ndarray:
    """v = t̂(wrong) − t̂(true) [embed] with the store's model (see `class_embeddings`)."""
    emb = class_embeddings(store, true, wrong, task=task, loaded=loaded)
    return cue_direction(torch.from_numpy(emb[0]), torch.from_numpy(emb[1])).numpy()


def blocked_texts(inputs: CueInputs, wrong_unit: np.ndarray, settings: Settings) -> np.ndarray:
    """[text] bool: texts that may not be cues (c_wrong, its synonyms, the block list, outside `allowed`)."""
    lowered = [t.strip().lower() for t in inputs.texts]
    blocked = inputs.embeddings @ wrong_unit >= settings.synonym_cosine
    names = {settings.wrong.strip().lower(), *(b.strip().lower() for b in settings.block)}
    blocked |= np.array([t in names for t in lowered])
    if settings.allowed is not None:
        allowed = {a.strip().lower() for a in settings.allowed}
        blocked |= np.array([t not in allowed for t in lowered])
    return blocked


def mine(inputs: CueInputs, v: np.ndarray, wrong_unit: np.ndarray, settings: Settings) -> tuple[np.ndarray, ...]:
    """(text_index [cue], score [cue], chosen neurons, blocked [text])."""
    blocked = blocked_texts(inputs, wrong_unit, settings)
    weights, chosen = cue_weights(torch.from_numpy(inputs.pcs), torch.from_numpy(v), settings.neurons)
    if settings.random_neurons is not None:  # Table 3's baseline: the same sum over random neurons
        rng = np.random.default_rng(settings.random_neurons)
        chosen = torch.from_numpy(np.sort(rng.choice(len(inputs.pcs), size=min(settings.neurons, len(inputs.pcs)),
                                                     replace=False)))
        along = torch.from_numpy(inputs.pcs @ v)
        weights = torch.zeros_like(along)
        weights[chosen] = along[chosen]
    support, coefs = torch.from_numpy(inputs.support), torch.from_numpy(inputs.coefs)
    allowed = torch.from_numpy(~blocked)
    if settings.ranking == "reference":
        ranked = entry_ranking(weights, support, coefs, settings.entries, allowed=allowed)
        index, score = ranked.indices[:settings.words], ranked.values[:settings.words]
    else:
        n_texts = len(inputs.texts)
        scores = text_scores(weights, support, coefs, n_texts)
        used = text_scores((weights != 0).to(torch.float64), support, (coefs != 0).to(torch.float64), n_texts) > 0
        ranked = top_ranked(scores, settings.words, allowed=allowed & used)
        index, score = ranked.indices, ranked.values
    return index.numpy().astype(np.int64), score.numpy().astype(np.float64), chosen.numpy().astype(np.int64), blocked


def _record(store: RunStore, settings: Settings) -> dict[str, Any]:
    upstream = [settings_digest((store.result_group_attrs(schema.OMP.path(layer=layer)) or {}).get(RESULT_ATTR))
                for layer in settings.layers]
    fields = ("true", "wrong", "layers", "neurons", "words", "ranking", "entries", "m", "synonym_cosine", "block",
              "allowed", "task", "random_neurons")
    return {**{f: getattr(settings, f) for f in fields}, "upstream": upstream}


def run(store: RunStore, settings: Settings, executor: Executor | None = None, *,
        loaded: LoadedModel | None = None) -> Result:
    """Mine the cue words of (true, wrong); written to `reductions/cues/{pair}` whole on a writable store.
    `executor` is accepted for the common job signature: the mining reads only per-neuron arrays."""
    inputs = cue_inputs(store, settings.layers, settings.m)
    with begin_reduction(store, "cues", _record(store, settings), allow_incomplete=settings.allow_incomplete,
                         force=settings.force) as reduction:
        if reduction.is_current(schema.CUES.path(pair=result_key(settings))):
            return Result.read(store, settings)
        classes = class_embeddings(store, settings.true, settings.wrong, task=settings.task, loaded=loaded)
        v = cue_direction(torch.from_numpy(classes[0]), torch.from_numpy(classes[1])).numpy()
        wrong = classes[1]
        index, score, chosen, blocked = mine(inputs, v, wrong / np.linalg.norm(wrong), settings)
        attrs = {"true": settings.true, "wrong": settings.wrong, "layers": list(settings.layers),
                 "offsets": list(inputs.offsets), "ranking": settings.ranking, "n_neurons": len(chosen),
                 "m": inputs.m, "v_norm": float(np.linalg.norm(v)), "task": settings.task,
                 "random_neurons": settings.random_neurons, **inputs.attrs,
                 "cues": [inputs.texts[i] for i in index],
                 "blocked": [t for t, b in zip(inputs.texts, blocked) if b and settings.allowed is None][:200]}
        result = Result(settings, index, score, chosen, attrs)
        if store.mode == "r+":
            result.write(reduction)
    return result


@dataclass(frozen=True)
class _FoolBlock:
    """Picklable map function: (fooled, valid) counts of a block: ⟨M(I), v⟩ > 0."""

    store: RunStore
    v: np.ndarray

    def __call__(self, rows: slice) -> np.ndarray:
        valid = self.store.read_valid(rows)
        emb = self.store.read(schema.IMAGE_EMBEDDING.path(), rows)[valid].astype(np.float64)
        return np.array([int((emb @ self.v > 0).sum()), int(valid.sum())], np.int64)


def fooling_rate(store: RunStore, true: str, wrong: str, executor: Executor | None = None, *,
                 task: str | None = None, loaded: LoadedModel | None = None) -> tuple[float, int, int]:
    """(share of the store's valid images with ⟨M(I), v⟩ > 0, that count, the number of images): the
    reference's success rule for semantic adversarial images, on any extracted set of generated images."""
    v = cue_direction_of(store, true, wrong, task=task, loaded=loaded)
    counts = reduce_rows(executor, store, row_blocks(store), _FoolBlock(store, v), np.add, desc="cues evaluate")
    if counts[1] == 0:
        raise ConfigError(f"{store.url} has no valid images to evaluate")
    return float(counts[0] / counts[1]), int(counts[0]), int(counts[1])
