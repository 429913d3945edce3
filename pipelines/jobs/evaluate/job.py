"""Mean-ablation of direct effects, evaluated zero-shot from the store alone (thesis §2.3, App. A).

Mean-ablating a set S of components turns an image's embedding into emb − Σ_{c∈S}(c − c̄), with c̄
the component's mean over the store's valid rows (`reductions/means/…`, computed once when missing).
Every term is already folded through ln_post with the image's own μ, σ (docs/methods.md), so no forward
pass is needed: the result equals ablating the same components at the output of the live model.

Ablations (names are the `ablation` column and the store's `ablations` attribute):
  baseline            nothing ablated
  mlps                every stored layer's MLP (thesis Table 2.1)
  cls_token           the class token attended from itself, Σ_h c_{0,l,h} of every stored layer (Table A.1)
  mlps+cls_token      both (Table A.1, last column)
  heads_to_L{l}       every head of the stored layers ≤ l, one per stored layer (Figure 2.2's curve)
  heads:L{l}H{h},…    a named set of heads
  keep_last_{k}       the MLPs and every head except those of the last k stored layers
With `--heads-layers` a subset, "stored layers" are that subset (the group attribute `layers.heads`).

Rows are streamed in row blocks (picklable map function, fixed-tree reduce over integer counts, so a
Ray run counts exactly what a local run counts). Results: `reductions/evaluation/<task>/accuracy`
and `…/correct` [ablation] with the ablation names in the attributes (`result.Result`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from clipscope.errors import ConfigError, ParameterError, StoreError
from clipscope.kernels.ablation import ablation_delta, masked_head_delta
from clipscope.kernels.zero_shot import correct_counts, zero_shot_logits
from clipscope.cluster.executor import Executor
from clipscope.pipelines.jobs.means.job import current_means, reduce_rows, row_blocks, stale_means
from clipscope.pipelines.jobs.evaluate.result import Result
from clipscope.pipelines.jobs.evaluate.settings import Settings
from clipscope.pipelines.models.loading import LoadedModel
from clipscope.pipelines.texts.zero_shot import ZeroShotTask, classifier, get_task, store_classes
from clipscope.storage.results import begin_reduction, settings_digest
from clipscope.storage import schema
from clipscope.storage.store import RunStore

CLS_ARRAY = schema.DIRECT_CLS_TOKEN.path()
HEADS, MLPS, EMBEDDING = schema.DIRECT_HEADS.path(), schema.DIRECT_MLPS.path(), schema.IMAGE_EMBEDDING.path()
# Rows converted to float64 at a time inside a block: bounds memory for wide models (ViT-L: ~150 MB).
_ROWS_AT_ONCE = 64

_HEAD_ITEM = re.compile(r"^(?:L(\d+)H(\d+)|(\d+):(\d+))$", re.IGNORECASE)


@dataclass(frozen=True)
class Ablation:
    """A set of mean-ablated components. `heads` are (layer, head) with 0-based stored layers."""

    name: str
    kind: str
    mlps: bool = False
    cls_token: bool = False
    heads: tuple[tuple[int, int], ...] = ()
    layer: int | None = None  # the last ablated layer of a cumulative ablation

    def __post_init__(self) -> None:
        if self.cls_token and self.heads:
            # the class-token term is part of its layer's head terms: ablating both counts it twice
            raise ConfigError(f"ablation {self.name!r} cannot combine the class-token term with head terms")


def stored_head_layers(store: RunStore) -> list[int]:
    layers = list(store.info.heads_layers)
    if not layers or HEADS not in store.array_names():
        raise StoreError(f"{store.url} holds no direct effects of heads; extract it with --heads-layers")
    return layers


def parse_heads(spec: str, layers: Sequence[int], n_heads: int) -> tuple[tuple[int, int], ...]:
    """'L10H3,L11H0' or '10:3,11:0' → ((10, 3), (11, 0)), checked against the stored layers and heads."""
    items = [item.strip() for item in spec.split(",")] if isinstance(spec, str) else []
    if not items or not all(items):
        raise ParameterError("heads", f"must be a comma-separated list like L10H3,L11H0 or 10:3,11:0, got {spec!r}")
    heads: list[tuple[int, int]] = []
    for item in items:
        match = _HEAD_ITEM.match(item)
        if match is None:
            raise ParameterError("heads", f"item {item!r} is not of the form L<layer>H<head> or <layer>:<head>")
        layer, head = (int(g) for g in (match.groups()[:2] if match.group(1) else match.groups()[2:]))
        if layer not in layers:
            raise ParameterError("heads", f"{item}: layer {layer} has no stored head terms; stored layers: {list(layers)}")
        if not 0 <= head < n_heads:
            raise ParameterError("heads", f"{item}: head must be in 0..{n_heads - 1}, got {head}")
        if (layer, head) in heads:
            raise ParameterError("heads", f"names L{layer}H{head} twice")
        heads.append((layer, head))
    return tuple(heads)


def head_set_name(heads: Sequence[tuple[int, int]]) -> str:
    return "heads:" + ",".join(f"L{l}H{h}" for l, h in heads)


def build_ablations(layers: Sequence[int], n_heads: int, *, heads: Sequence[str] = (),
                    keep_last: Sequence[int] = (), include_cls: bool = True) -> list[Ablation]:
    """The ablations of the module docstring, in table order."""
    if isinstance(heads, str):
        heads = (heads,)
    out = [Ablation("baseline", "baseline"), Ablation("mlps", "mlps", mlps=True)]
    if include_cls:
        out += [Ablation("cls_token", "cls_token", cls_token=True),
                Ablation("mlps+cls_token", "mlps+cls_token", mlps=True, cls_token=True)]
    for layer in layers:
        upto = tuple((l, h) for l in layers if l <= layer for h in range(n_heads))
        out.append(Ablation(f"heads_to_L{layer}", "cumulative", heads=upto, layer=layer))
    for spec in heads:
        chosen = parse_heads(spec, layers, n_heads)
        out.append(Ablation(head_set_name(chosen), "heads", heads=chosen))
    for k in keep_last:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(layers):
            raise ParameterError("keep_last", f"must be an integer in 1..{len(layers)} (the stored layers), got {k!r}")
        early = tuple((l, h) for l in layers[:len(layers) - k] for h in range(n_heads))
        out.append(Ablation(f"keep_last_{k}", "keep_last", mlps=True, heads=early))
    names = [a.name for a in out]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"ablation {repeated[0]!r} is asked for twice")
    return out


def needed_arrays(ablations: Sequence[Ablation]) -> list[str]:
    names = []
    if any(a.heads for a in ablations):
        names.append(HEADS)
    if any(a.mlps for a in ablations):
        names.append(MLPS)
    if any(a.cls_token for a in ablations):
        names.append(CLS_ARRAY)
    return names


def ablation_means(store: RunStore, names: Sequence[str], *,
                   executor: Executor | None = None) -> dict[str, np.ndarray]:
    """Dataset means of `names` over the valid rows; computed (and stored) when missing or stale."""
    missing = [n for n in names if n not in store.array_names()]
    if CLS_ARRAY in missing:
        raise StoreError(f"{store.url} has no {CLS_ARRAY} (extracted before clipscope stored it); re-extract the "
                         "store to evaluate the class-token ablation, or leave it out (--no-cls-token)")
    if missing:
        raise StoreError(f"{store.url} has no {missing[0]}; it is made by `clipscope extract` (re-extract the store)")
    stale = stale_means(store, names)
    if stale and store.mode != "r+":
        raise StoreError(f"{store.url} has no up-to-date dataset mean of {stale[0]} and is opened read-only; "
                         "open it writable (mode 'r+') so the means can be computed and stored")
    return current_means(store, names, executor=executor)


def _head_masks(ablations: Sequence[Ablation], layers: Sequence[int], n_heads: int) -> np.ndarray:
    masks = np.zeros((len(ablations), len(layers), n_heads), bool)
    position = {layer: i for i, layer in enumerate(layers)}
    for a, ablation in enumerate(ablations):
        for layer, head in ablation.heads:
            masks[a, position[layer], head] = True
    return masks


def iter_ablated_embeddings(store: RunStore, ablations: Sequence[Ablation], means: dict[str, np.ndarray],
                            rows: slice) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Over the valid rows of `rows`, a few at a time: (row numbers [sample], float64 mean-ablated
    embeddings [ablation sample embed])."""
    valid = store.read_valid(rows)
    row_numbers = np.arange(rows.start, rows.stop)[valid]
    layers = stored_head_layers(store)
    masks = torch.from_numpy(_head_masks(ablations, layers, store.array(HEADS).shape[2]))
    uses_heads = masks.flatten(1).any(1).tolist()
    arrays = {name: store.read(name, rows)[valid] for name in [EMBEDDING, *needed_arrays(ablations)]}
    mean = {name: torch.from_numpy(value) for name, value in means.items()}
    for start in range(0, len(row_numbers), _ROWS_AT_ONCE):
        part = {n: torch.from_numpy(v[start:start + _ROWS_AT_ONCE].astype(np.float64)) for n, v in arrays.items()}
        emb = part[EMBEDDING]
        mlp = ablation_delta(part[MLPS], mean[MLPS]) if MLPS in part else None
        cls = ablation_delta(part[CLS_ARRAY], mean[CLS_ARRAY]) if CLS_ARRAY in part else None
        heads = part[HEADS] - mean[HEADS] if HEADS in part else None
        out = []
        for ablation, mask, with_heads in zip(ablations, masks, uses_heads):
            delta = torch.zeros_like(emb)
            if ablation.mlps:
                delta = delta + mlp
            if ablation.cls_token:
                delta = delta + cls
            if with_heads:
                delta = delta + masked_head_delta(heads, mask)
            out.append(emb - delta)
        yield row_numbers[start:start + _ROWS_AT_ONCE], torch.stack(out)


@dataclass(frozen=True)
class _EvaluateBlock:
    """Picklable map function: correct predictions per ablation over one block's labelled rows."""

    store: RunStore
    ablations: tuple[Ablation, ...]
    means: dict[str, np.ndarray]
    weights: np.ndarray  # [embed class]
    classes: np.ndarray  # [sample] class index, −1 unlabelled or invalid

    def __call__(self, rows: slice) -> dict[str, Any]:
        weights = torch.from_numpy(self.weights.astype(np.float64))
        correct, n = np.zeros(len(self.ablations), np.int64), 0
        for row_numbers, embeddings in iter_ablated_embeddings(self.store, self.ablations, self.means, rows):
            classes = torch.from_numpy(self.classes[row_numbers])
            correct += correct_counts(zero_shot_logits(embeddings, weights), classes).numpy()
            n += int((classes >= 0).sum())
        return {"correct": correct, "n": n}


def _add_counts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {"correct": a["correct"] + b["correct"], "n": a["n"] + b["n"]}


def run(store: RunStore, settings: Settings, executor: Executor | None = None, *,
        loaded: LoadedModel | None = None) -> Result:
    """Zero-shot accuracy of `settings.task` under every ablation; written into the store when it is writable.

    `loaded` is the store's model (for the text side), loaded from the store's identity when not given
    and the task's prompts are not yet encoded in the store. The group `reductions/evaluation/<task>` is written whole; a rerun
    with the same ablations and task on the same extraction reads it back (unless `settings.force`).
    """
    task = get_task(settings.task)
    layers = stored_head_layers(store)
    n_heads = store.array(HEADS).shape[2]
    ablations = build_ablations(layers, n_heads, heads=settings.heads, keep_last=settings.keep_last,
                                include_cls=settings.include_cls)
    record = {"task": task.name, "ablations": [a.name for a in ablations], "prompts": settings_digest(task.prompts)}
    with begin_reduction(store, "evaluate", record, allow_incomplete=settings.allow_incomplete,
                         force=settings.force) as reduction:
        if reduction.is_current(schema.EVALUATION.path(task=task.name)):
            return Result.read(store, settings)
        correct, n = _count_correct(store, task, ablations, executor, loaded)
        result = Result(settings, tuple(a.name for a in ablations), tuple(a.kind for a in ablations), correct,
                        correct / n, n, len(task.classnames), tuple(layers))
        if store.mode == "r+":
            result.write(reduction)
    return result


def _count_correct(store: RunStore, task: ZeroShotTask, ablations: Sequence[Ablation], executor: Executor | None,
                   loaded: LoadedModel | None) -> tuple[np.ndarray, int]:
    classes = store_classes(store, task)
    if not (classes >= 0).any():
        raise ConfigError(f"{store.url} has no valid sample with a label for zero-shot task {task.name!r}; "
                          "its samples.parquet needs the `label` (cls) of each sample")
    means = ablation_means(store, needed_arrays(ablations), executor=executor)
    weights = classifier(store, task, loaded)
    counts = reduce_rows(executor, store, row_blocks(store),
                         _EvaluateBlock(store, tuple(ablations), means, weights, classes), _add_counts,
                         desc="evaluate")
    return counts["correct"], int(counts["n"])
