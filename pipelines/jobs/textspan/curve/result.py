"""The textspan curve's result: zero-shot accuracy for every m, and its two reference points."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clipscope.errors import StoreError
from clipscope.pipelines.jobs.textspan.curve.settings import Settings
from clipscope.pipelines.texts.zero_shot import ZeroShotTask, default_task
from clipscope.storage import schema
from clipscope.storage.results import Reduction
from clipscope.storage.store import RunStore


def resolve(store: RunStore, settings: Settings) -> tuple[tuple[int, ...], str | ZeroShotTask]:
    """The layers and the task `settings` mean for `store`."""
    layers = tuple(store.info.heads_layers)[-4:] if settings.layers is None else tuple(int(l) for l in settings.layers)
    return layers, default_task(store) if settings.task is None else settings.task


@dataclass(frozen=True)
class Result:
    settings: Settings
    task: str
    layers: tuple[int, ...]
    basis_sizes: tuple[int, ...]
    accuracies: np.ndarray  # [basis_size]
    baseline_accuracy: float  # the unablated image embedding
    heads_kept_accuracy: float  # chosen heads unprojected, every other term mean-ablated
    n_labelled: int
    normalize: bool
    pool: str
    texts_key: str  # the pool's key in the store's text-embedding cache

    def write(self, run: Reduction) -> None:
        """`reductions/textspan/curve/<task>` replaced whole (an earlier curve may have had other sizes)."""
        attrs = {"task": self.task, "layers": list(self.layers), "baseline_accuracy": self.baseline_accuracy,
                 "heads_kept_accuracy": self.heads_kept_accuracy, "n_labelled": self.n_labelled,
                 "normalize": self.normalize, "pool": self.pool, "texts_key": self.texts_key,
                 "projection": "uncentred, onto the span of the first m picked texts' embeddings"}
        run.write_group(schema.TEXTSPAN_CURVE.path(task=self.task), {
            "basis_size": (np.array(self.basis_sizes, np.int64), schema.TEXTSPAN_CURVE.dims("basis_size"), attrs),
            "accuracy": (self.accuracies.astype(np.float64), schema.TEXTSPAN_CURVE.dims("accuracy"), attrs),
        }, attrs)

    @classmethod
    def read(cls, store: RunStore, settings: Settings) -> Result:
        layers, task = resolve(store, settings)
        name = task if isinstance(task, str) else task.name
        group = schema.TEXTSPAN_CURVE.path(task=name)
        command = f"`clipscope textspan {store.url} --layers {' '.join(map(str, layers))} --curve --task {name}`"
        if f"{group}/accuracy" not in store.array_names():
            raise StoreError(f"{store.url} has no TextSpan curve for {name}; it is made by {command}")
        attrs = store.array(f"{group}/accuracy").attrs
        if tuple(attrs["layers"]) != layers:
            raise StoreError(f"{group} of {store.url} projects the heads of layers {attrs['layers']}, not "
                             f"{list(layers)}; rerun {command}")
        return cls(settings, name, layers, tuple(int(m) for m in store.read_result(f"{group}/basis_size")),
                   store.read_result(f"{group}/accuracy"), float(attrs["baseline_accuracy"]),
                   float(attrs["heads_kept_accuracy"]), int(attrs["n_labelled"]), bool(attrs["normalize"]),
                   str(attrs["pool"]), str(attrs["texts_key"]))
