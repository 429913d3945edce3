"""What `clipscope second-order` makes: `reductions/second_order/layer_{l}` (statistics, top-k rows, PCs)
and, with a task, its `evaluation` [ablation] (zero-shot accuracy under the ablations)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipscope.errors import StoreError
from clipscope.kernels.second_order_ablation import ABLATIONS
from clipscope.pipelines.jobs.second_order.settings import SecondOrderSettings
from clipscope.storage import schema
from clipscope.storage.results import Reduction
from clipscope.storage.store import RunStore

EVALUATION = "evaluation"
RESULT_DIMS: dict[str, tuple[str, ...]] = {
    leaf: schema.SECOND_ORDER.dims(leaf) for leaf in schema.SECOND_ORDER.leaves if leaf != EVALUATION
}  # the arrays of the statistics (`evaluation` is written by the evaluation's own reduction)


@dataclass(frozen=True, eq=False)
class Result:
    """`arrays` (keys of RESULT_DIMS) and `attrs` of the layer's statistics; with `settings.task`, the
    accuracy under each of `ABLATIONS` (`evaluation` [ablation]) over `labelled` images."""

    settings: SecondOrderSettings
    arrays: dict[str, np.ndarray]
    attrs: dict[str, Any] = field(default_factory=dict)
    evaluation: np.ndarray | None = None
    labelled: int | None = None

    @property
    def layer(self) -> int:
        return self.settings.layer

    @property
    def accuracy(self) -> dict[str, float]:
        """Accuracy per ablation name ({} without an evaluation)."""
        if self.evaluation is None:
            return {}
        return {name: float(value) for name, value in zip(ABLATIONS, self.evaluation)}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Result):
            return NotImplemented
        same_arrays = self.arrays.keys() == other.arrays.keys() and all(
            np.array_equal(value, other.arrays[name], equal_nan=True) for name, value in self.arrays.items())
        same_evaluation = (self.evaluation is None) == (other.evaluation is None) and (
            self.evaluation is None or np.array_equal(self.evaluation, other.evaluation))
        return (self.settings == other.settings and self.attrs == other.attrs and same_arrays and same_evaluation
                and self.labelled == other.labelled)

    def write(self, run: Reduction) -> None:
        """Replace everything under reductions/second_order/layer_{l} (an evaluation of older PCs included)
        as one unit: the group is complete or absent."""
        arrays = {name: (value, RESULT_DIMS[name], self.attrs) for name, value in self.arrays.items()}
        run.write_group(schema.SECOND_ORDER.path(layer=self.layer), arrays, self.attrs)

    def write_evaluation(self, run: Reduction) -> None:
        """Add `evaluation` [ablation] to the layer's group (complete or absent), under the evaluation's run."""
        run.write_array(evaluation_name(self.layer), np.asarray(self.evaluation, np.float64),
                        schema.SECOND_ORDER.dims(EVALUATION),
                        {"ablations": list(ABLATIONS), "task": self.settings.task, "labelled": self.labelled,
                         "layer": self.layer})

    @classmethod
    def read(cls, store: RunStore, settings: SecondOrderSettings) -> Result:
        """The result stored for `settings.layer` (and `settings.task`'s evaluation when a task is set);
        StoreError when it is absent."""
        arrays, attrs = read_statistics(store, settings.layer)
        if attrs.get("top_k") != settings.top_k:
            raise StoreError(f"{store.url} holds the second-order results of layer {settings.layer} for top_k "
                             f"{attrs.get('top_k')}, not {settings.top_k}; run `clipscope second-order {store.url} "
                             f"--layer {settings.layer} --top-k {settings.top_k}`")
        if settings.task is None:
            return cls(settings, arrays, attrs)
        evaluation, labelled = read_evaluation(store, settings)
        return cls(settings, arrays, attrs, evaluation, labelled)


def evaluation_name(layer: int) -> str:
    return f"{schema.SECOND_ORDER.path(layer=layer)}/{EVALUATION}"


def read_statistics(store: RunStore, layer: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    prefix = schema.SECOND_ORDER.path(layer=layer)
    names = set(store.array_names())
    if store.result_group_attrs(prefix) is None or f"{prefix}/pc" not in names:
        raise StoreError(f"{store.url} has no second-order results for layer {layer}; run "
                         f"`clipscope second-order {store.url} --layer {layer}` first")
    arrays = {key: store.read_result(f"{prefix}/{key}") for key in RESULT_DIMS if f"{prefix}/{key}" in names}
    attrs = {k: v for k, v in store.array(f"{prefix}/pc").attrs.asdict().items() if not k.startswith("clipscope_")}
    return arrays, attrs


def read_evaluation(store: RunStore, settings: SecondOrderSettings) -> tuple[np.ndarray, int]:
    name = evaluation_name(settings.layer)
    if name not in store.array_names() or store.array(name).attrs.get("task") != settings.task:
        raise StoreError(f"{store.url} has no second-order evaluation of layer {settings.layer} for task "
                         f"{settings.task!r}; run `clipscope second-order {store.url} --layer {settings.layer} "
                         f"--task {settings.task}`")
    return store.read_result(name), int(store.array(name).attrs["labelled"])
