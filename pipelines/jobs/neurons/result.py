"""What the neurons job computes, written to and read from `reductions/omp/layer_{l}/`.

  m[m]                      the sparsities (each ≤ the pool size)
  support[neuron, pick]     text indices in OMP pick order for the largest m (−1: stopped early)
  coefs[m, neuron, pick]    coefficient of support[neuron, pick] in the m-atom solution (0 past m)
  residual_norm[neuron, m]  ‖r_n − r̂_n‖ of the m-atom solution
  accuracy[m]               zero-shot accuracy with r̂ from m atoms (attrs: task, PC1-only and baseline)
attrs: pool, pool_hash, n_texts, texts_key (the cached embeddings), m, preprocessing, pc_sha256.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clipscope.errors import StoreError
from clipscope.pipelines.jobs.neurons.settings import Settings
from clipscope.storage import schema
from clipscope.storage.results import Reduction
from clipscope.storage.store import RunStore

ATTRS = ("pool", "pool_hash", "n_texts", "texts_key", "m", "preprocessing", "pc_sha256")


@dataclass(frozen=True)
class ReconstructionAccuracy:
    """Zero-shot accuracy of `task` with every neuron of the layer replaced by its reconstruction."""

    task: str
    m: tuple[int, ...]
    accuracy: np.ndarray  # [m]
    pc_accuracy: float  # r̂ = r (PC1 only)
    baseline: float  # no replacement
    n_labelled: int

    def write(self, run: Reduction, layer: int) -> None:
        """Adds `accuracy` to the layer's OMP group (complete or absent)."""
        attrs = {"task": self.task, "pc1_accuracy": self.pc_accuracy, "baseline_accuracy": self.baseline,
                 "n_labelled": self.n_labelled, "projection": "pc"}
        run.write_array(accuracy_name(layer), self.accuracy, schema.OMP.dims("accuracy"), attrs)

    @classmethod
    def read(cls, store: RunStore, layer: int) -> ReconstructionAccuracy | None:
        """The stored accuracy of `layer`'s OMP; None when it was not measured."""
        name = accuracy_name(layer)
        if name not in store.array_names():
            return None
        attrs = store.array(name).attrs
        m = tuple(int(v) for v in store.read_result(f"{schema.OMP.path(layer=layer)}/m"))
        return cls(attrs["task"], m, store.read_result(name), attrs["pc1_accuracy"], attrs["baseline_accuracy"],
                   attrs["n_labelled"])


def accuracy_name(layer: int) -> str:
    return f"{schema.OMP.path(layer=layer)}/accuracy"


@dataclass(frozen=True)
class Result:
    """The OMP of every neuron's PC of `layer`: support [neuron pick], coefs [m neuron pick], residual_norm
    [neuron m], the sparsities m, the attrs it was made with, and the reconstruction accuracy when measured."""

    layer: int
    support: np.ndarray
    coefs: np.ndarray
    residual_norm: np.ndarray
    m: tuple[int, ...]
    attrs: dict
    accuracy: ReconstructionAccuracy | None = None

    def write(self, run: Reduction) -> None:
        """Replaces the layer's group whole (another pool or m changes the shapes, an old accuracy is stale);
        the accuracy, when measured, is written by its own reduction (`ReconstructionAccuracy.write`)."""
        run.write_group(schema.OMP.path(layer=self.layer), {
            "m": (np.asarray(self.m, np.int64), schema.OMP.dims("m"), self.attrs),
            "support": (self.support, schema.OMP.dims("support"), self.attrs),
            "coefs": (self.coefs, schema.OMP.dims("coefs"), self.attrs),
            "residual_norm": (self.residual_norm, schema.OMP.dims("residual_norm"), self.attrs),
        }, self.attrs)

    @classmethod
    def read(cls, store: RunStore, settings: Settings) -> Result:
        """What the job stored for `settings.layer` (StoreError naming the command when absent)."""
        return cls.of_layer(store, settings.layer)

    @classmethod
    def of_layer(cls, store: RunStore, layer: int) -> Result:
        group = schema.OMP.path(layer=layer)
        if f"{group}/support" not in store.array_names():
            raise StoreError(f"{store.url} has no {group}; run `clipscope neurons {store.url} --layer {layer}` first")
        attrs = store.array(f"{group}/support").attrs
        return cls(
            layer=layer, support=store.read_result(f"{group}/support"), coefs=store.read_result(f"{group}/coefs"),
            residual_norm=store.read_result(f"{group}/residual_norm"),
            m=tuple(int(v) for v in store.read_result(f"{group}/m")), attrs={k: attrs[k] for k in ATTRS},
            accuracy=ReconstructionAccuracy.read(store, layer),
        )
