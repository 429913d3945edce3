"""Zero-shot segmentation over a store, as a map-reduce over row blocks (spec S7).

Map (one block of rows, on the executor): the method's heat maps → bilinear to the input size (grid methods)
→ optionally clipped at 0 → min–max → foreground by the threshold → per row: correct and labelled pixel
counts, per-class intersection and union, AP over both channels (`kernels.segmentation_metrics`). The
partials are per-row arrays, concatenated in block order, so any number of workers gives the same bytes.
The dataset metrics (pixel accuracy, IoU per class and mIoU accumulated over the dataset; mAP = mean of
per-image AP) are sums over the stored rows (`Result`).

Rows scored: valid rows with a mask (`masks`, extract --masks) and a class (the predicted class always
exists; `class_mode="label"` needs the row's label in the task).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clipscope.cluster.executor import Executor, LocalExecutor
from clipscope.errors import StoreError
from clipscope.kernels.segmentation_metrics import (
    foreground,
    image_ap,
    intersection_union,
    normalise,
    pixel_counts,
    upsample,
)
from clipscope.pipelines.data.masks import MASK_MISSING
from clipscope.pipelines.jobs.segment.methods import Context, get_method
from clipscope.pipelines.jobs.segment.result import ROW_ARRAYS, Result, group_of
from clipscope.pipelines.jobs.segment.settings import SegmentSettings
from clipscope.pipelines.models.loading import LoadedModel
from clipscope.pipelines.texts.zero_shot import ZeroShotTask, classifier, default_task, get_task, store_classes
from clipscope.storage import schema
from clipscope.storage.layout import row_slices
from clipscope.storage.results import begin_reduction, settings_digest
from clipscope.storage.store import RunStore


def grid_and_size(store: RunStore) -> tuple[tuple[int, int], tuple[int, int]]:
    spec = store.attrs.get("model_spec") or {}
    size, patch = tuple(spec.get("image_size", ())), tuple(spec.get("patch_size", ()))
    if len(size) != 2 or len(patch) != 2:
        raise StoreError(f"{store.url} records no model_spec (image and patch size); re-extract it")
    return (size[0] // patch[0], size[1] // patch[1]), (int(size[0]), int(size[1]))


def row_classes(store: RunStore, task: ZeroShotTask, weights: np.ndarray, class_mode: str) -> np.ndarray:
    """[row] the class whose map is segmented: the predicted one, or the label's; −1 for rows not scored."""
    valid = store.read_valid()
    if class_mode == "label":
        classes = store_classes(store, task)
    else:
        classes = np.full(store.n_rows, -1, np.int64)
        for rows in row_slices(store.n_rows, store.rows_per_chunk * 16):
            emb = store.read(schema.IMAGE_EMBEDDING.path(), rows).astype(np.float64)
            classes[rows] = np.argmax(emb @ weights, axis=1)
    classes[~valid] = -1
    return classes


@dataclass(frozen=True)
class _SegmentBlock:
    """Picklable map: one block of rows → its per-row counts and AP."""

    store: RunStore
    method: str
    context: Context
    clip: bool
    threshold: str | float

    def maps(self, rows: slice) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scored [rows], and for the scored rows: normalised map, foreground, truth, labelled pixels)."""
        classes = self.context.classes[rows]
        n = rows.stop - rows.start
        masks = self.store.read(schema.MASKS.path(), rows)
        labelled = masks != MASK_MISSING
        scored = (classes >= 0) & labelled.reshape(n, -1).any(1)
        if not scored.any():
            empty = torch.zeros((0, *self.context.size))
            return scored, empty, empty.bool(), empty.bool(), empty.bool()
        block = Context(self.context.settings, classes, self.context.weights, self.context.grid, self.context.size)
        heat = torch.from_numpy(np.asarray(get_method(self.method).heat(self.store, rows, block), np.float64)[scored])
        if get_method(self.method).resolution == "grid":
            heat = upsample(heat, self.context.size)
        target = self.context.settings.target
        truth = torch.from_numpy((masks == 1) if target == "main" else (masks > 0) & labelled)[scored]
        norm = normalise(heat, self.clip)
        return scored, norm, foreground(norm, self.threshold), truth, torch.from_numpy(labelled[scored])

    def __call__(self, rows: slice) -> dict[str, np.ndarray]:
        classes = self.context.classes[rows]
        n = rows.stop - rows.start
        out = {"class_index": np.full(n, -1, np.int64), "correct": np.zeros(n, np.int64),
               "labelled": np.zeros(n, np.int64), "intersection": np.zeros((n, 2), np.int64),
               "union": np.zeros((n, 2), np.int64), "ap": np.full(n, np.nan)}
        scored, norm, pred, truth, known = self.maps(rows)
        if not scored.any():
            return out
        correct, count = pixel_counts(pred, truth, known)
        inter, union = intersection_union(pred, truth, known)
        out["class_index"][scored] = classes[scored]
        out["correct"][scored], out["labelled"][scored] = correct.numpy(), count.numpy()
        out["intersection"][scored], out["union"][scored] = inter.numpy(), union.numpy()
        out["ap"][scored] = image_ap(norm, truth, known).numpy()
        return out


def _concatenate(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([a[key], b[key]]) for key in a}


def _resolved(store: RunStore, settings: SegmentSettings):
    method = get_method(settings.method)
    if schema.MASKS.path() not in store.array_names():
        raise StoreError(f"{store.url} has no masks; extract with --masks (a mask member per sample) to segment")
    if method.check is not None:
        method.check(store, settings)
    task = get_task(settings.task or default_task(store))
    clip = method.clip if settings.clip is None else settings.clip
    threshold = method.threshold if settings.threshold == "auto" else settings.threshold
    return task, clip, threshold


def row_maps(store: RunStore, settings: SegmentSettings, rows: list[int], *, loaded: LoadedModel | None = None
             ) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """For figures: (row, normalised map, foreground, truth) of the given rows that are scored."""
    task, clip, threshold = _resolved(store, settings)
    weights = classifier(store, task, loaded).astype(np.float64)
    context = Context(settings, row_classes(store, task, weights, settings.class_mode), weights,
                      *grid_and_size(store))
    mapper = _SegmentBlock(store, settings.method, context, clip, threshold)
    out = []
    for row in rows:
        scored, norm, pred, truth, _ = mapper.maps(slice(row, row + 1))
        if scored[0]:
            out.append((row, norm[0].numpy(), pred[0].numpy(), truth[0].numpy()))
    return out


def run(store: RunStore, settings: SegmentSettings, executor: Executor | None = None, *,
        loaded: LoadedModel | None = None) -> Result:
    """Segment every scored row with `settings.method`; writes `reductions/segmentation/{method}/{task}`."""
    task, clip, threshold = _resolved(store, settings)
    geometry = str((store.attrs.get("config") or {}).get("mask_geometry", "preprocess"))
    record = {"method": settings.method, "task": task.name, "class_mode": settings.class_mode, "clip": clip,
              "threshold": threshold, "target": settings.target, "layers": settings.layers,
              "top_neurons": settings.top_neurons, "centre_classes": settings.centre_classes, "seed": settings.seed,
              "prompts": settings_digest(task.prompts)}
    group = group_of(settings.method, task.name)
    with begin_reduction(store, "segment", record, allow_incomplete=settings.allow_incomplete,
                         force=settings.force) as reduction:
        if reduction.is_current(group):
            return Result.read(store, settings)
        weights = classifier(store, task, loaded).astype(np.float64)
        classes = row_classes(store, task, weights, settings.class_mode)
        grid, size = grid_and_size(store)
        context = Context(settings, classes, weights, grid, size)
        blocks = row_slices(store.n_rows, settings.block_rows or store.rows_per_chunk * 16)
        mapper = _SegmentBlock(store, settings.method, context, clip, threshold)
        arrays = (executor or LocalExecutor(progress="off")).map_reduce(
            blocks, mapper, _concatenate, desc=f"segment ({settings.method})", unit="rows",
            sizes=[b.stop - b.start for b in blocks])
        selected, selection = (None, None)
        method = get_method(settings.method)
        if method.selection is not None:
            selected, selection = method.selection(store, context)
        result = Result(settings, task.name, clip, threshold, geometry, **{k: arrays[k] for k in ROW_ARRAYS},
                        selected=selected, selection=selection)
        if store.mode == "r+":
            result.write(reduction)
    return result
