"""The segment job's result: per-row counts and AP of one method on one task, and the dataset metrics."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from clipscope.errors import StoreError
from clipscope.pipelines.jobs.segment.settings import SegmentSettings
from clipscope.storage import schema
from clipscope.storage.results import Reduction
from clipscope.storage.store import RunStore

ROW_ARRAYS = ("class_index", "correct", "labelled", "intersection", "union", "ap")


def group_of(method: str, task: str) -> str:
    return schema.SEGMENTATION.path(method=method, task=task)


@dataclass(frozen=True)
class Result:
    settings: SegmentSettings
    task: str
    clip: bool
    threshold: str | float
    geometry: str
    class_index: np.ndarray  # [row] the class whose map was segmented; −1: row not scored
    correct: np.ndarray  # [row]
    labelled: np.ndarray  # [row]
    intersection: np.ndarray  # [row seg_class]
    union: np.ndarray  # [row seg_class]
    ap: np.ndarray  # [row], NaN where not scored
    selected: np.ndarray | None = None  # [class rank] the units a method chose (neurons), else None
    selection: dict | None = None  # how they were chosen (layers, offsets, random, centre_classes)

    @property
    def scored(self) -> np.ndarray:
        return self.class_index >= 0

    @property
    def n(self) -> int:
        return int(self.scored.sum())

    @property
    def pixel_acc(self) -> float:
        total = int(self.labelled.sum())
        return int(self.correct.sum()) / total if total else float("nan")

    @property
    def iou(self) -> np.ndarray:
        inter, union = self.intersection.sum(0), self.union.sum(0)
        return np.where(union > 0, inter / np.maximum(union, 1), 1.0)

    @property
    def miou(self) -> float:
        return float(self.iou.mean())

    @property
    def map(self) -> float:
        return float(np.mean(self.ap[self.scored])) if self.n else float("nan")

    def metrics(self) -> dict[str, float]:
        return {"pixel_acc": self.pixel_acc, "miou": self.miou, "map": self.map, "n": self.n}

    def write(self, run: Reduction) -> None:
        attrs = {"task": self.task, "method": self.settings.method, "class_mode": self.settings.class_mode,
                 "clip": self.clip, "threshold": self.threshold, "target": self.settings.target,
                 "geometry": self.geometry, "n": self.n,
                 **{k: (None if v != v else v) for k, v in self.metrics().items() if k != "n"}}
        arrays = {leaf: (getattr(self, leaf), schema.SEGMENTATION.dims(leaf)) for leaf in ROW_ARRAYS}
        if self.selected is not None:
            arrays["selected"] = (self.selected, schema.SEGMENTATION.dims("selected"))
            attrs["selection"] = self.selection
        run.write_group(group_of(self.settings.method, self.task), arrays, attrs)

    @classmethod
    def read(cls, store: RunStore, settings: SegmentSettings) -> Result:
        from clipscope.pipelines.texts.zero_shot import default_task

        task = settings.task or default_task(store)
        group = group_of(settings.method, task)
        attrs = store.result_group_attrs(group)
        if attrs is None:
            raise StoreError(f"{store.url} has no segmentation by {settings.method} on {task}; run "
                             f"`clipscope segment {store.url} --method {settings.method} --task {task}`")
        arrays = {leaf: store.read_result(f"{group}/{leaf}") for leaf in ROW_ARRAYS}
        if f"{group}/selected" in store.array_names():
            arrays.update(selected=store.read_result(f"{group}/selected"), selection=attrs.get("selection"))
        return cls(settings, task, bool(attrs["clip"]), attrs["threshold"], str(attrs["geometry"]), **arrays)

    def table(self) -> pa.Table:
        """One row: the method, task and its metrics."""
        m = self.metrics()
        return pa.table({"method": [self.settings.method], "task": [self.task], "class": [self.settings.class_mode],
                         "pixel_acc": [m["pixel_acc"]], "miou": [m["miou"]], "map": [m["map"]], "n": [m["n"]]})
