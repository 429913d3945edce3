"""Every parameter of `clipscope concepts`, declared as data and validated once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from clipscope.params import Boolean, Interval, NoneValue, Options, Validated

THRESHOLDS = ("topk", "p98")


@dataclass(frozen=True)
class Settings(Validated):
    """`layer`: the neuron layer (second-order and OMP results needed); `m`: the OMP sparsity whose
    coefficients γ weigh the texts (None: the largest stored ≤ embed/4, `job.default_m`); `threshold`: τ_n =
    the `rank`-th largest centred norm of neuron n (`topk`, the reference's; `rank` None = the stored top-k,
    100 by default) or its 98th percentile (`p98`, `norm_p98`); `top`: texts kept per image; `neuron_chunk`,
    `chunks_per_block`: memory and task sizes; `allow_incomplete`, `force`: see `storage.results`."""

    layer: int
    m: int | None = None
    threshold: str = "topk"
    rank: int | None = None
    top: int = 10
    neuron_chunk: int = 256
    chunks_per_block: int = 4
    allow_incomplete: bool = False
    force: bool = False

    parameter_constraints: ClassVar = {
        "layer": [Interval(int, 0)],
        "m": [Interval(int, 1), NoneValue()],
        "threshold": [Options(*THRESHOLDS)],
        "rank": [Interval(int, 1), NoneValue()],
        **{name: [Interval(int, 1)] for name in ("top", "neuron_chunk", "chunks_per_block")},
        "allow_incomplete": [Boolean()],
        "force": [Boolean()],
    }
