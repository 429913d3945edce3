"""What `clipscope cues` makes: `reductions/cues/{pair}/` (pair = `result_key(settings)`: `pair_key(true, wrong)`,
with `__random{seed}` for the random-neurons baseline).

  text_index[cue]        pool text of each mined cue word, best first
  score[cue]             its Eq. 6 score w_j (or, with the reference ranking, its best single entry)
  neurons[cue_neuron]    the neurons of largest |⟨v, r_n⟩|, flat over the layers (offsets in attrs)
attrs: true, wrong, layers, offsets, ranking, n_neurons, m, v_norm, task, pool, texts_key, cues (the words), blocked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipscope.errors import StoreError
from clipscope.pipelines.jobs.cues.settings import Settings
from clipscope.storage import schema
from clipscope.storage.results import Reduction
from clipscope.storage.store import RunStore

ATTRS = ("true", "wrong", "layers", "offsets", "ranking", "n_neurons", "m", "v_norm", "task", "random_neurons",
         "pool", "texts_key", "cues", "blocked")


def pair_key(true: str, wrong: str) -> str:
    """The group name of a class pair: each name's non-alphanumeric runs become '-', joined by '__'."""
    def slug(name: str) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "-", name.strip()).strip("-").lower() or "x"

    return f"{slug(true)}__{slug(wrong)}"


def result_key(settings: Settings) -> str:
    """The group name of a result: the pair's, `__random{seed}` added for the random-neurons baseline."""
    key = pair_key(settings.true, settings.wrong)
    return key if settings.random_neurons is None else f"{key}__random{settings.random_neurons}"


@dataclass(frozen=True, eq=False)
class Result:
    settings: Settings
    text_index: np.ndarray  # [cue] int64
    score: np.ndarray  # [cue] float64
    neurons: np.ndarray  # [cue_neuron] int64
    attrs: dict[str, Any]

    @property
    def cues(self) -> list[str]:
        return list(self.attrs["cues"])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Result):
            return NotImplemented
        return (self.settings == other.settings and self.attrs == other.attrs
                and np.array_equal(self.text_index, other.text_index) and np.array_equal(self.score, other.score)
                and np.array_equal(self.neurons, other.neurons))

    def write(self, run: Reduction) -> None:
        decl = schema.CUES
        run.write_group(decl.path(pair=result_key(self.settings)), {
            "text_index": (self.text_index, decl.dims("text_index"), self.attrs),
            "score": (self.score, decl.dims("score"), self.attrs),
            "neurons": (self.neurons, decl.dims("neurons"), self.attrs),
        }, self.attrs)

    @classmethod
    def read(cls, store: RunStore, settings: Settings) -> Result:
        group = schema.CUES.path(pair=result_key(settings))
        if store.result_group_attrs(group) is None:
            raise StoreError(f"{store.url} has no {group}; run `clipscope cues {store.url} --true "
                             f"{settings.true!r} --wrong {settings.wrong!r}` first")
        attrs = store.array(f"{group}/text_index").attrs
        return cls(settings, store.read_result(f"{group}/text_index"), store.read_result(f"{group}/score"),
                   store.read_result(f"{group}/neurons"), {k: attrs[k] for k in ATTRS})
