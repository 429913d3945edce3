"""The segment job's parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from clipscope.errors import ParameterError
from clipscope.params import Boolean, Each, Interval, NoneValue, Options, Text, Validated

CLASS_MODES = ("predicted", "label")
TARGETS = ("foreground", "main")


def parse_threshold(value: str | float) -> str | float:
    """`--threshold`: auto (the method's), mean, or a number in [0, 1]."""
    if value in ("auto", "mean"):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ParameterError("threshold", f"must be auto, mean or a number in [0, 1], got {value!r}") from None
    if isinstance(value, bool) or not 0 <= number <= 1:
        raise ParameterError("threshold", f"must be auto, mean or a number in [0, 1], got {value!r}")
    return number


@dataclass(frozen=True)
class SegmentSettings(Validated):
    """`method`: a registered segmentation method (`methods.list_methods()`); `task`: the zero-shot task whose
    classifier gives the class directions (None: the store's default task); `class_mode`: the map of the
    predicted class (the reference protocol) or of the label's class; `clip`: clip the map at 0 before the
    min–max (None: the method's default — tokens clip, as the reference); `threshold`: "auto" (the method's:
    mean, or 0.5 for neurons), "mean" or a number; `target`: foreground = mask > 0 (ImageNet-segmentation),
    main = mask == 1 (the shapes world's main object); `layers`, `top_neurons`: for the neuron method;
    `centre_classes`: the neuron method ranks neurons by |⟨r_n, w_c − w̄⟩| (the class-specific part, w̄ the
    mean class direction, as the token method's heat) instead of the reference's |⟨r_n, w_c⟩|;
    `seed`: for the random method; `block_rows`: rows per map task (None: 16 chunks)."""

    method: str = "tokens"
    task: str | None = None
    class_mode: str = "predicted"
    clip: bool | None = None
    threshold: str | float = "auto"
    target: str = "foreground"
    layers: tuple[int, ...] | None = None
    top_neurons: int = 200
    centre_classes: bool = False
    seed: int = 0
    block_rows: int | None = None
    allow_incomplete: bool = False
    force: bool = False

    parameter_constraints: ClassVar = {
        "method": [Text()],
        "task": [NoneValue(), Text()],
        "class_mode": [Options(*CLASS_MODES, text="predicted or label")],
        "clip": [NoneValue(), Boolean()],
        "threshold": [Options("auto", "mean"), Interval(float, 0, 1)],
        "target": [Options(*TARGETS, text="foreground or main")],
        "layers": [NoneValue(), Each(Interval(int, 0), min_len=1)],
        "top_neurons": [Interval(int, 1)],
        "centre_classes": [Boolean()],
        "seed": [Interval(int)],
        "block_rows": [NoneValue(), Interval(int, 1)],
        "allow_incomplete": [Boolean()],
        "force": [Boolean()],
    }


Settings = SegmentSettings
