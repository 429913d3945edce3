"""The means job's parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from clipscope.params import Boolean, Each, NoneValue, Text, Validated


@dataclass(frozen=True)
class Settings(Validated):
    """`names`: the per-sample arrays to average (None: every direct-effect and second-order array);
    `allow_incomplete`: reduce the done shards of an unfinished extraction; `force`: recompute up-to-date means."""

    names: tuple[str, ...] | None = None
    allow_incomplete: bool = False
    force: bool = False

    parameter_constraints: ClassVar = {
        "names": [NoneValue(), Each(Text(), min_len=1)],
        "allow_incomplete": [Boolean()],
        "force": [Boolean()],
    }
