"""The roles job's parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from clipscope.params import Boolean, Each, Interval, NoneValue, Text, Validated


@dataclass(frozen=True)
class RolesSettings(Validated):
    """`layers`: whose heads (None: every layer with TextSpan results, at most the last 4); `m`: a head's top
    texts that vote for its label (the paper: 5); `min_match`: texts of the label a head needs to count as
    associated (the paper: 3); `text_labels`: a file of text<TAB>property lines (None: the TextSpan pool's
    built-in tags); `labels`: a CSV of layer,head,label naming each head's label directly (a human's or an
    LLM's; the texts' tags, when available, still give the association)."""

    layers: tuple[int, ...] | None = None
    m: int = 5
    min_match: int = 3
    text_labels: str | None = None
    labels: str | None = None
    allow_incomplete: bool = False
    force: bool = False

    parameter_constraints: ClassVar = {
        "layers": [NoneValue(), Each(Interval(int, 0), min_len=1)],
        "m": [Interval(int, 1)],
        "min_match": [Interval(int, 1)],
        "text_labels": [NoneValue(), Text()],
        "labels": [NoneValue(), Text()],
        "allow_incomplete": [Boolean()],
        "force": [Boolean()],
    }


Settings = RolesSettings
