"""The means job's result: the float64 mean over valid rows of each averaged array."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clipscope.errors import StoreError
from clipscope.pipelines.jobs.means.settings import Settings
from clipscope.storage import schema
from clipscope.storage.results import extraction_fingerprint, store_lock
from clipscope.storage.store import RunStore


def mean_array_names(store: RunStore) -> list[str]:
    """Per-sample arrays whose dataset mean is needed for mean-ablation."""
    sources = (schema.IMAGE_EMBEDDING, schema.DIRECT_EMBEDDING, schema.DIRECT_BIAS, schema.DIRECT_MLPS,
               schema.DIRECT_HEADS, schema.DIRECT_CLS_TOKEN, schema.DIRECT_TOKENS, schema.SECOND_ORDER_WEIGHTS,
               schema.SECOND_ORDER_SHARED)
    return [n for n in store.array_names(per_sample=True) if any(d.matches(n) is not None for d in sources)]


def resolved_names(store: RunStore, settings: Settings) -> tuple[str, ...]:
    return tuple(mean_array_names(store) if settings.names is None else settings.names)


@dataclass(frozen=True)
class Result:
    settings: Settings
    means: dict[str, np.ndarray]  # array name → float64 mean over valid rows (the array's dims without `sample`)
    count: int  # valid rows averaged

    def write(self, store: RunStore) -> None:
        """Each mean as one array of `reductions/means` (complete or absent), under the store's lock, with the
        number of rows it averages and the extraction's fingerprint in its attributes (see `stale_means`)."""
        attrs: dict = {"count": self.count}
        inputs = extraction_fingerprint(store)
        if inputs is not None:
            attrs["inputs"] = inputs
        with store_lock(store, "clipscope means"):
            for name, mean in self.means.items():
                store.write_result(schema.MEANS.path(array=name), mean, store.dims(name)[1:], attrs)

    @classmethod
    def read(cls, store: RunStore, settings: Settings = Settings()) -> Result:
        names = resolved_names(store, settings)
        existing = set(store.array_names())
        missing = [n for n in names if schema.MEANS.path(array=n) not in existing]
        if missing:
            raise StoreError(f"{store.url} has no {schema.MEANS.path(array=missing[0])}; the means job "
                             "(clipscope.pipelines.jobs.means.run, or any of `clipscope evaluate`, `clipscope "
                             "second-order`, `clipscope neurons`) writes it")
        counts = {int(store.array(schema.MEANS.path(array=n)).attrs["count"]) for n in names}
        if len(counts) != 1:
            raise StoreError(f"the means of {list(names)} in {store.url} average different numbers of rows "
                             f"({sorted(counts)}); rerun the means job")
        means = {n: store.read_result(schema.MEANS.path(array=n)).astype(np.float64) for n in names}
        return cls(settings, means, counts.pop())
