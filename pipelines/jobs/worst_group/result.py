"""What `clipscope worst-group` makes: `reductions/worst_group/<task>/`.

  group_count[class, group]                 labelled valid rows per cell
  group_correct[ablation, class, group]     correct zero-shot predictions per cell
  group_accuracy[ablation, class, group]    their ratio (NaN: empty cell)
  worst_group[ablation]                     min over non-empty cells
  accuracy[ablation]                        overall accuracy
attrs: task, ablations (names), kinds, heads (per ablation: [[layer, head], …]), groups (the stored group
values of the `group` axis), classes, keep_last, combine, random (heads, trials, seed, best), means_from (None, or
the other store's url, valid rows and extraction fingerprint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from clipscope.errors import StoreError
from clipscope.pipelines.jobs.worst_group.settings import Settings
from clipscope.storage import schema
from clipscope.storage.results import Reduction
from clipscope.storage.store import RunStore

ATTRS = ("task", "ablations", "kinds", "heads", "groups", "classes", "keep_last", "combine", "random", "means_from")


@dataclass(frozen=True, eq=False)
class Result:
    settings: Settings
    group_count: np.ndarray  # [class group] int64
    group_correct: np.ndarray  # [ablation class group] int64
    attrs: dict[str, Any]

    @property
    def ablations(self) -> list[str]:
        return list(self.attrs["ablations"])

    @property
    def group_accuracy(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.group_count > 0, self.group_correct / np.maximum(self.group_count, 1), np.nan)

    @property
    def worst_group(self) -> np.ndarray:
        acc = self.group_accuracy.reshape(len(self.ablations), -1)[:, self.group_count.ravel() > 0]
        return acc.min(axis=1) if acc.shape[1] else np.full(len(self.ablations), np.nan)

    @property
    def accuracy(self) -> np.ndarray:
        return self.group_correct.sum((1, 2)) / max(int(self.group_count.sum()), 1)

    def row(self, name: str) -> int:
        return self.ablations.index(name)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Result):
            return NotImplemented
        return (self.settings == other.settings and self.attrs == other.attrs
                and np.array_equal(self.group_count, other.group_count)
                and np.array_equal(self.group_correct, other.group_correct))

    def write(self, run: Reduction) -> None:
        decl = schema.WORST_GROUP
        arrays = {"group_count": self.group_count, "group_correct": self.group_correct,
                  "group_accuracy": self.group_accuracy, "worst_group": self.worst_group, "accuracy": self.accuracy}
        run.write_group(decl.path(task=self.settings.task),
                        {k: (np.asarray(v), decl.dims(k), self.attrs) for k, v in arrays.items()}, self.attrs)

    @classmethod
    def read(cls, store: RunStore, settings: Settings) -> Result:
        group = schema.WORST_GROUP.path(task=settings.task)
        if store.result_group_attrs(group) is None:
            raise StoreError(f"{store.url} has no {group}; run `clipscope worst-group {store.url} --task "
                             f"{settings.task}` first")
        attrs = store.array(f"{group}/group_count").attrs
        return cls(settings, store.read_result(f"{group}/group_count"), store.read_result(f"{group}/group_correct"),
                   {k: attrs.get(k) for k in ATTRS})
