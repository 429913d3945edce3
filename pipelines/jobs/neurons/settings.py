"""The parameters of the neurons job, declared as data and validated once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from clipscope.errors import ParameterError
from clipscope.params import Boolean, Each, Interval, NoneValue, Text, Validated

DEFAULT_M = (4, 8, 16, 32, 64, 128)
NEURONS_PER_TASK = 512


@dataclass(frozen=True)
class Settings(Validated):
    """OMP of every neuron's second-order PC of `layer` on `texts` (the pool `pool_name`), then (`accuracy`) the
    zero-shot accuracy of `task` (None: the store's default task) with every neuron replaced by its
    reconstruction.

    m: the sparsities solved (sorted, without repeats; each capped by the pool size when run);
    reference_preprocessing: the reference code's dictionary (texts centred and scaled per dimension);
    neurons_per_task: neurons per executor task; allow_incomplete / force: see storage.results.
    """

    layer: int
    texts: tuple[str, ...]
    pool_name: str = "custom"
    m: tuple[int, ...] = DEFAULT_M
    reference_preprocessing: bool = False
    accuracy: bool = True
    task: str | None = None
    neurons_per_task: int = NEURONS_PER_TASK
    allow_incomplete: bool = False
    force: bool = False

    parameter_constraints: ClassVar = {
        "layer": [Interval(int, 0)],
        "texts": [Each(Text(), min_len=1)],
        "pool_name": [Text()],
        "m": [Interval(int, 1), Each(Interval(int, 1), min_len=1)],
        "reference_preprocessing": [Boolean()],
        "accuracy": [Boolean()],
        "task": [NoneValue(), Text()],
        "neurons_per_task": [Interval(int, 1)],
        "allow_incomplete": [Boolean()],
        "force": [Boolean()],
    }

    def __post_init__(self) -> None:
        values = [self.m] if isinstance(self.m, int) and not isinstance(self.m, bool) else self.m
        if isinstance(values, (list, tuple)):  # name the offending sparsity itself
            if not values:
                raise ParameterError("m", "must name at least one sparsity")
            for value in values:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ParameterError("m", f"must be integers ≥ 1, got {value!r}")
        super().__post_init__()
        object.__setattr__(self, "m", tuple(sorted(set(values))))
        object.__setattr__(self, "texts", tuple(self.texts))
