"""Every parameter of `clipscope worst-group`, declared as data and validated once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from clipscope.params import Boolean, Each, Interval, NoneValue, Text, Validated


@dataclass(frozen=True)
class Settings(Validated):
    """`task`: the zero-shot task; `heads`: named head sets ("L3H3,L3H2"), one ablation each;
    `heads_by_role`: the heads `clipscope roles` labelled with this property form one more set (with
    `min_share`: the heads whose share of TextSpan variance for the property is at least this, instead);
    `random_heads` R, `trials` T, `seed`: T random sets of R heads drawn from the kept layers (the last
    `keep_last`, else all stored), the best worst group reported (the reference's "best of 5");
    `keep_last` K with `combine`: every set is ablated together with all heads of the layers before the
    last K and all MLPs (the reference's combined ablation); without `combine` the K ablation is one more
    row; `means_from`: the URL of another store of the same model (a train split) whose valid rows give the
    ablation means (None: the evaluated rows, as the reference); `allow_incomplete`, `force`: see
    `storage.results`."""

    task: str
    heads: tuple[str, ...] = ()
    heads_by_role: str | None = None
    min_share: float | None = None
    random_heads: int | None = None
    trials: int = 5
    seed: int = 0
    keep_last: int | None = None
    combine: bool = True
    means_from: str | None = None
    allow_incomplete: bool = False
    force: bool = False

    parameter_constraints: ClassVar = {
        "task": [Text()],
        "heads": [Each(Text())],
        "heads_by_role": [NoneValue(), Text()],
        "min_share": [NoneValue(), Interval(float, 0.0, 1.0)],
        "random_heads": [NoneValue(), Interval(int, 1)],
        "trials": [Interval(int, 1)],
        "seed": [Interval(int, 0)],
        "keep_last": [NoneValue(), Interval(int, 1)],
        "combine": [Boolean()],
        "means_from": [NoneValue(), Text()],
        "allow_incomplete": [Boolean()],
        "force": [Boolean()],
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "heads", (self.heads,) if isinstance(self.heads, str) else tuple(self.heads))
