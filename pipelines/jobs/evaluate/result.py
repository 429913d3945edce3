"""What `clipscope evaluate` makes: zero-shot accuracy per ablation, in `reductions/evaluation/<task>`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from clipscope.errors import StoreError
from clipscope.pipelines.jobs.evaluate.settings import Settings
from clipscope.storage import schema
from clipscope.storage.results import Reduction
from clipscope.storage.store import RunStore

_CUMULATIVE = "heads_to_L"


@dataclass(frozen=True, eq=False)
class Result:
    """Per ablation (table order): its name and kind, correct predictions and accuracy over the `n`
    labelled valid rows; `heads_layers` are the stored head layers the ablations refer to."""

    settings: Settings
    ablations: tuple[str, ...]
    kinds: tuple[str, ...]
    correct: np.ndarray  # [ablation] int64
    accuracy: np.ndarray  # [ablation] float64
    n: int
    n_classes: int
    heads_layers: tuple[int, ...]

    @property
    def layers(self) -> list[int | None]:
        """The last ablated layer of each cumulative ablation (None for the others)."""
        return [int(name.removeprefix(_CUMULATIVE)) if kind == "cumulative" else None
                for name, kind in zip(self.ablations, self.kinds)]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Result):
            return NotImplemented
        return (self.settings == other.settings and self.ablations == other.ablations and self.kinds == other.kinds
                and self.n == other.n and self.n_classes == other.n_classes
                and self.heads_layers == other.heads_layers
                and np.array_equal(self.correct, other.correct) and np.array_equal(self.accuracy, other.accuracy))

    def table(self) -> pa.Table:
        """One row per ablation: ablation, kind, layer, accuracy, correct, n."""
        return pa.table({
            "ablation": list(self.ablations),
            "kind": list(self.kinds),
            "layer": pa.array(self.layers, pa.int64()),
            "accuracy": self.accuracy,
            "correct": self.correct,
            "n": pa.array([self.n] * len(self.ablations), pa.int64()),
        })

    def attrs(self) -> dict[str, Any]:
        return {"task": self.settings.task, "ablations": list(self.ablations), "kinds": list(self.kinds),
                "n": int(self.n), "n_classes": int(self.n_classes), "heads_layers": list(self.heads_layers)}

    def write(self, run: Reduction) -> None:
        """Replace `reductions/evaluation/<task>` (another run may have had other head sets) as one unit."""
        decl, attrs = schema.EVALUATION, self.attrs()
        arrays = {"accuracy": (np.asarray(self.accuracy, np.float64), decl.dims("accuracy"), attrs),
                  "correct": (np.asarray(self.correct, np.int64), decl.dims("correct"), attrs)}
        run.write_group(decl.path(task=self.settings.task), arrays, attrs)

    @classmethod
    def read(cls, store: RunStore, settings: Settings) -> Result:
        """The evaluation of `settings.task` stored in `store` (StoreError when there is none)."""
        group = schema.EVALUATION.path(task=settings.task)
        if store.result_group_attrs(group) is None:
            raise StoreError(f"{store.url} has no {group}; it is made by "
                             f"`clipscope evaluate {store.url} --task {settings.task}`")
        attrs = store.array(f"{group}/correct").attrs
        return cls(settings, tuple(attrs["ablations"]), tuple(attrs["kinds"]), store.read_result(f"{group}/correct"),
                   store.read_result(f"{group}/accuracy"), int(attrs["n"]), int(attrs["n_classes"]),
                   tuple(attrs["heads_layers"]))
