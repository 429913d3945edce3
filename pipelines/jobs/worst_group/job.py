"""Worst-group accuracy under mean-ablation of head sets (thesis §2.4, Table 2.3; the reference's
`compute_use_specific_heads.py` protocol).

Every image has a class (the task's, from its label) and a group (`samples.parquet`'s `group` column: e.g.
Waterbirds' place, the shapes-spurious world's colour). Zero-shot accuracy is counted per (class, group)
cell under each ablation; the worst group is the minimum over the non-empty cells. Ablations (the means are
over the evaluated rows, as in the reference, or over another store's with `means_from`; the embeddings come
from `evaluate`'s mean-ablation of the stored direct effects, so no forward pass is needed):

  baseline                 nothing ablated
  heads:L…H…               a named set (`heads`), or the heads `clipscope roles` labelled `heads_by_role`
  random_{t}               trial t of `random_heads` heads drawn (seeded) from the kept layers
  …+keep_last_{K}          with `keep_last` and `combine`: the set together with every head of the layers
                           before the last K and all MLPs — the reference's combined ablation
  keep_last_{K}            that part alone (a reference row)
The random baseline reports the best worst group over its trials (`attrs.random.best`), as the reference's
"10 random heads, best of 5 trials".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from clipscope.cluster.executor import Executor
from clipscope.errors import ConfigError, ParameterError, StoreError
from clipscope.kernels.zero_shot import predict
from clipscope.pipelines.jobs.evaluate.job import (
    Ablation,
    ablation_means,
    head_set_name,
    iter_ablated_embeddings,
    needed_arrays,
    parse_heads,
    stored_head_layers,
)
from clipscope.pipelines.jobs.means.job import current_means, reduce_rows, row_blocks
from clipscope.pipelines.jobs.worst_group.result import Result
from clipscope.pipelines.jobs.worst_group.settings import Settings
from clipscope.pipelines.models.loading import LoadedModel
from clipscope.pipelines.texts.zero_shot import classifier, get_task, store_classes
from clipscope.storage import schema
from clipscope.storage.results import begin_reduction, extraction_fingerprint, settings_digest
from clipscope.storage.store import RunStore

Heads = tuple[tuple[int, int], ...]


def store_groups(store: RunStore) -> np.ndarray:
    """[row] the `group` of every row (−1: none or not valid)."""
    samples = store.read_samples()
    if samples is None or samples.num_rows == 0:
        raise StoreError(f"{store.url} has no samples.parquet; finish the extraction first")
    groups = np.full(store.n_rows, -1, np.int64)
    groups[samples.column("row").to_numpy()] = samples.column("group").to_numpy()
    groups[~store.read_valid()] = -1
    return groups


def role_heads(store: RunStore, role: str, min_share: float | None = None) -> Heads:
    """The (layer, head) pairs `clipscope roles` labelled `role` (from `reductions/roles`), or with `min_share`
    those whose stored share for `role` is at least that."""
    name = f"{schema.ROLES.path()}/label"
    attrs = store.result_group_attrs(schema.ROLES.path())
    if attrs is None or name not in store.array_names():
        raise StoreError(f"{store.url} has no head roles; run `clipscope roles {store.url}` first")
    properties, layers = list(attrs["properties"]), list(attrs["layers"])
    if role not in properties:
        raise ParameterError("heads_by_role", f"must be one of the stored properties {properties}, got {role!r}")
    if min_share is None:
        chosen = store.read_result(name) == properties.index(role)
    else:
        chosen = store.read_result(f"{schema.ROLES.path()}/share")[:, :, properties.index(role)] >= min_share
    heads = tuple((int(layers[i]), int(h)) for i, h in zip(*np.nonzero(chosen)))
    if not heads:
        how = f"with a share ≥ {min_share}" if min_share is not None else "labelled"
        raise ParameterError("heads_by_role", f"no head of {store.url} is {how} {role!r}")
    return heads


def random_head_sets(layers: Sequence[int], n_heads: int, size: int, trials: int, seed: int) -> list[Heads]:
    """`trials` sets of `size` distinct heads of `layers`, drawn with numpy's generator seeded by `seed`."""
    pool = [(l, h) for l in layers for h in range(n_heads)]
    if size > len(pool):
        raise ParameterError("random_heads", f"must be ≤ the {len(pool)} heads of layers {list(layers)}, got {size}")
    rng = np.random.default_rng(seed)
    return [tuple(sorted(pool[i] for i in rng.choice(len(pool), size=size, replace=False))) for _ in range(trials)]


def build(store: RunStore, settings: Settings) -> tuple[list[Ablation], dict[str, Any]]:
    """The ablations of the module docstring and the random baseline's description."""
    layers = stored_head_layers(store)
    n_heads = store.array(schema.DIRECT_HEADS.path()).shape[2]
    k = settings.keep_last
    if k is not None and not 1 <= k <= len(layers):
        raise ParameterError("keep_last", f"must be in 1..{len(layers)} (the stored layers), got {k}")
    kept = layers if k is None else layers[len(layers) - k:]
    early: Heads = () if k is None else tuple((l, h) for l in layers[:len(layers) - k] for h in range(n_heads))
    named = [parse_heads(spec, layers, n_heads) for spec in settings.heads]
    sets: list[tuple[str, str, Heads]] = [(head_set_name(heads), "heads", heads) for heads in named]
    if settings.min_share is not None and settings.heads_by_role is None:
        raise ParameterError("min_share", "goes with heads_by_role (the property whose share it bounds)")
    if settings.heads_by_role is not None:
        chosen = role_heads(store, settings.heads_by_role, settings.min_share)
        unknown = [f"L{l}H{h}" for l, h in chosen if l not in layers]
        if unknown:
            raise StoreError(f"heads labelled {settings.heads_by_role!r} ({', '.join(unknown)}) have no stored terms")
        sets.append((f"role:{settings.heads_by_role}", "role", chosen))
    random: dict[str, Any] = {}
    if settings.random_heads is not None:
        drawn = random_head_sets(kept, n_heads, settings.random_heads, settings.trials, settings.seed)
        sets += [(f"random_{t}", "random", heads) for t, heads in enumerate(drawn)]
        random = {"heads": settings.random_heads, "trials": settings.trials, "seed": settings.seed}
    combine = k is not None and settings.combine
    out = [Ablation("baseline", "baseline")]
    for name, kind, heads in sets:
        if combine:
            merged = tuple(sorted(set(heads) | set(early)))
            out.append(Ablation(f"{name}+keep_last_{k}", kind, mlps=True, heads=merged))
        else:
            out.append(Ablation(name, kind, heads=heads))
    if k is not None:
        out.append(Ablation(f"keep_last_{k}", "keep_last", mlps=True, heads=early))
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"a head set is asked for twice: {names}")
    return out, random


@dataclass(frozen=True)
class _GroupBlock:
    """Picklable map function: correct predictions per (ablation, class, group) and counts per cell."""

    store: RunStore
    ablations: tuple[Ablation, ...]
    means: dict[str, np.ndarray]
    weights: np.ndarray  # [embed class]
    classes: np.ndarray  # [row] class (−1 unlabelled)
    groups: np.ndarray  # [row] group index (−1 none)
    n_groups: int

    def __call__(self, rows: slice) -> tuple[np.ndarray, np.ndarray]:
        n_classes = self.weights.shape[1]
        count = np.zeros((n_classes, self.n_groups), np.int64)
        correct = np.zeros((len(self.ablations), n_classes, self.n_groups), np.int64)
        weights = torch.from_numpy(self.weights.astype(np.float64))
        for row_numbers, embeddings in iter_ablated_embeddings(self.store, self.ablations, self.means, rows):
            cls, grp = self.classes[row_numbers], self.groups[row_numbers]
            keep = (cls >= 0) & (grp >= 0)
            cls, grp = cls[keep], grp[keep]
            np.add.at(count, (cls, grp), 1)
            hits = predict(embeddings[:, torch.from_numpy(keep)], weights).numpy() == cls[None, :]
            for a in range(len(self.ablations)):
                np.add.at(correct[a], (cls[hits[a]], grp[hits[a]]), 1)
        return count, correct


def _add(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return a[0] + b[0], a[1] + b[1]


def means_source(store: RunStore, settings: Settings) -> tuple[RunStore, dict[str, Any] | None]:
    """The store whose valid rows give the ablation means, and (for `means_from`) what the record keeps of it:
    another store must come from the same model (checkpoint sha256, ln convention) and hold every head layer
    of this one."""
    if settings.means_from is None:
        return store, None
    try:
        other = RunStore.open(settings.means_from, "r")
    except (StoreError, OSError) as err:
        raise ParameterError("means_from", f"cannot open {settings.means_from}: {err}") from None
    mine, theirs = store.info, other.info
    identity = [(m.name, m.sha256, m.seed) for m in (theirs.model, mine.model)]
    if identity[0] != identity[1]:
        raise ParameterError("means_from", f"{other.url} was extracted with {theirs.model.name} (sha256 "
                                           f"{theirs.model.sha256}, seed {theirs.model.seed}), {store.url} with "
                                           f"{mine.model.name} (sha256 {mine.model.sha256}, seed {mine.model.seed}); "
                                           "the means must come from the same model")
    if theirs.ln_convention != mine.ln_convention:
        raise ParameterError("means_from", f"{other.url} uses the {theirs.ln_convention} convention, {store.url} "
                                           f"{mine.ln_convention}")
    missing = sorted(set(mine.heads_layers) - set(theirs.heads_layers))
    if missing:
        raise ParameterError("means_from", f"{other.url} lacks the head layers {missing} of {store.url}")
    return other, {"url": other.url, "rows": int(other.read_valid().sum()), "inputs": extraction_fingerprint(other)}


def run(store: RunStore, settings: Settings, executor: Executor | None = None, *,
        loaded: LoadedModel | None = None) -> Result:
    """Per-(class, group) accuracy under every ablation; written to `reductions/worst_group/<task>` whole."""
    task = get_task(settings.task)
    ablations, random = build(store, settings)
    source, means_record = means_source(store, settings)
    record = {"task": task.name, "prompts": settings_digest(task.prompts),
              "ablations": [[a.name, [list(h) for h in a.heads], a.mlps] for a in ablations],
              "means_from": means_record}
    with begin_reduction(store, "worst-group", record, allow_incomplete=settings.allow_incomplete,
                         force=settings.force) as reduction:
        if reduction.is_current(schema.WORST_GROUP.path(task=task.name)):
            return Result.read(store, settings)
        classes, raw_groups = store_classes(store, task), store_groups(store)
        values = np.unique(raw_groups[(raw_groups >= 0) & (classes >= 0)])
        if not len(values):
            raise ConfigError(f"no labelled valid row of {store.url} has a group; extract the shards with "
                              "`--group-key KEY` (the json member's key holding each sample's group)")
        groups = np.where(raw_groups >= 0, np.searchsorted(values, raw_groups), -1)
        means = (ablation_means(store, needed_arrays(ablations), executor=executor) if source is store
                 else current_means(source, needed_arrays(ablations), executor=executor))
        block = _GroupBlock(store, tuple(ablations), means, classifier(store, task, loaded), classes, groups,
                            len(values))
        count, correct = reduce_rows(executor, store, row_blocks(store), block, _add, desc="worst-group")
        attrs = {"task": task.name, "ablations": [a.name for a in ablations], "kinds": [a.kind for a in ablations],
                 "heads": [[list(h) for h in a.heads] for a in ablations], "groups": values.tolist(),
                 "classes": list(task.classnames), "keep_last": settings.keep_last, "combine": settings.combine,
                 "random": random, "means_from": means_record}
        result = Result(settings, count, correct, attrs)
        if random:
            trials = [i for i, kind in enumerate(attrs["kinds"]) if kind == "random"]
            best = max(trials, key=lambda i: (result.worst_group[i], -i))
            result.attrs["random"] = {**random, "best": attrs["ablations"][best]}
        if store.mode == "r+":
            result.write(reduction)
    return result
