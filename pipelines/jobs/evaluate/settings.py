"""Every parameter of `clipscope evaluate`, declared as data and validated once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from clipscope.params import Boolean, Each, Interval, Text, Validated


@dataclass(frozen=True)
class Settings(Validated):
    """`task`: the zero-shot task's name; `heads`: named head sets ("L10H3,L11H0" or "10:3,11:0"), one
    ablation each; `keep_last`: k values of the keep-only-the-last-k-layers'-heads ablations;
    `include_cls`: the class-token ablations; `allow_incomplete`, `force`: see `storage.results`."""

    task: str
    heads: tuple[str, ...] = ()
    keep_last: tuple[int, ...] = ()
    include_cls: bool = True
    allow_incomplete: bool = False
    force: bool = False

    parameter_constraints: ClassVar = {
        "task": [Text()],
        "heads": [Each(Text())],
        "keep_last": [Each(Interval(int))],  # 1..(stored layers): checked against the store
        "include_cls": [Boolean()],
        "allow_incomplete": [Boolean()],
        "force": [Boolean()],
    }
