"""What `clipscope concepts` makes: `reductions/concepts/layer_{l}/`.

  text_index[row, concept]  pool text of each discovered concept, best first (−1: no concept / row not valid)
  score[row, concept]       w_j(I) = Σ_{n∈𝒩(I)} γ_j^n ν_n(I) of that text (NaN where text_index is −1)
  n_active[row]             |𝒩(I)|, the neurons with ν_n(I) > τ_n (−1: row not valid)
attrs: layer, m, threshold, rank, top, pool, texts_key, n_neurons, count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from clipscope.errors import StoreError
from clipscope.pipelines.jobs.concepts.settings import Settings
from clipscope.storage import schema
from clipscope.storage.results import Reduction
from clipscope.storage.store import RunStore

ATTRS = ("layer", "m", "threshold", "rank", "top", "pool", "texts_key", "n_neurons", "count")


@dataclass(frozen=True, eq=False)
class Result:
    """Per store row: the top texts and their scores, and the number of active neurons."""

    settings: Settings
    text_index: np.ndarray  # [row concept] int64
    score: np.ndarray  # [row concept] float64
    n_active: np.ndarray  # [row] int64
    attrs: dict[str, Any]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Result):
            return NotImplemented
        return (self.settings == other.settings and self.attrs == other.attrs
                and np.array_equal(self.text_index, other.text_index)
                and np.array_equal(self.score, other.score, equal_nan=True)
                and np.array_equal(self.n_active, other.n_active))

    def write(self, run: Reduction) -> None:
        """Replace `reductions/concepts/layer_{l}` whole (complete or absent)."""
        decl = schema.CONCEPTS
        run.write_group(decl.path(layer=self.settings.layer), {
            "text_index": (self.text_index, decl.dims("text_index"), self.attrs),
            "score": (self.score, decl.dims("score"), self.attrs),
            "n_active": (self.n_active, decl.dims("n_active"), self.attrs),
        }, self.attrs)

    @classmethod
    def read(cls, store: RunStore, settings: Settings) -> Result:
        """What the job stored for `settings.layer` (StoreError naming the command when absent)."""
        group = schema.CONCEPTS.path(layer=settings.layer)
        if store.result_group_attrs(group) is None:
            raise StoreError(f"{store.url} has no {group}; run `clipscope concepts {store.url} --layer "
                             f"{settings.layer}` first")
        attrs = store.array(f"{group}/text_index").attrs
        return cls(settings, store.read_result(f"{group}/text_index"), store.read_result(f"{group}/score"),
                   store.read_result(f"{group}/n_active"), {k: attrs[k] for k in ATTRS})
