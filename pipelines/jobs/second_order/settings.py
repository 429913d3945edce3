"""Every parameter of `clipscope second-order`, declared as data and validated once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from clipscope.kernels.neuron_pca import DEFAULT_TOP_K
from clipscope.params import Boolean, Interval, NoneValue, Text, Validated


@dataclass(frozen=True)
class SecondOrderSettings(Validated):
    """`layer`: the MLP layer (extracted with --second-order-layers); `top_k`: images of largest effect
    norm per neuron; `neuron_chunk`: neurons per PC task and per contraction (bounds [rows, chunk, embed]
    temporaries); `chunks_per_block`: store chunks per row block of a map task; `task`: the zero-shot
    task of the ablation evaluation (None: no evaluation); `allow_incomplete`, `force`: see
    `storage.results`."""

    layer: int
    top_k: int = DEFAULT_TOP_K
    neuron_chunk: int = 256
    chunks_per_block: int = 4
    task: str | None = None
    allow_incomplete: bool = False
    force: bool = False

    parameter_constraints: ClassVar = {
        "layer": [Interval(int, 0)],
        **{name: [Interval(int, 1)] for name in ("top_k", "neuron_chunk", "chunks_per_block")},
        "task": [Text(), NoneValue()],
        "allow_incomplete": [Boolean()],
        "force": [Boolean()],
    }

    def statistics_record(self) -> dict[str, Any]:
        """The settings the statistics depend on (the reduction's record)."""
        return {"layer": self.layer, "top_k": self.top_k, "neuron_chunk": self.neuron_chunk,
                "chunks_per_block": self.chunks_per_block}


Settings = SecondOrderSettings
