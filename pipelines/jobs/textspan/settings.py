"""The textspan job's parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from clipscope.errors import ParameterError
from clipscope.kernels.textspan import DEFAULT_RANK_RTOL, DEFAULT_SPAN_RANK
from clipscope.params import Boolean, Each, Interval, NoneValue, Options, Text, Validated


def parse_span_rank(value: str | int) -> str | int:
    """`--span-rank`: "auto" or an integer ≥ 1 (used literally)."""
    if value == "auto":
        return value
    try:
        rank = int(value)
    except (TypeError, ValueError):
        raise ParameterError("span_rank", f"must be 'auto' or an integer ≥ 1, got {value!r}") from None
    if isinstance(value, bool) or rank < 1 or str(rank) != str(value).strip():
        raise ParameterError("span_rank", f"must be 'auto' or an integer ≥ 1, got {value!r}")
    return rank


@dataclass(frozen=True)
class TextSpanSettings(Validated):
    """`layers`: whose heads to describe (None: the last 4 with stored head terms); `texts`: the pool's texts,
    named `pool` (None: the texts of the registered pool `pool`); `basis_size`: texts per head; `span_rank`:
    "auto" or the rank used literally; `normalize`: divide head terms by ‖image embedding‖; `rank_rtol`: the
    numerical rank's tolerance; `allow_incomplete`, `force`: see storage.results.begin_reduction."""

    layers: tuple[int, ...] | None = None
    texts: tuple[str, ...] | None = None
    pool: str | None = None
    basis_size: int = 10
    span_rank: int | str = DEFAULT_SPAN_RANK
    normalize: bool = True
    rank_rtol: float = DEFAULT_RANK_RTOL
    allow_incomplete: bool = False
    force: bool = False

    parameter_constraints: ClassVar = {
        "layers": [NoneValue(), Each(Interval(int, 0), min_len=1)],
        "texts": [NoneValue(), Each(Text(nonempty=False), min_len=1)],
        "pool": [NoneValue(), Text()],
        "basis_size": [Interval(int, 1)],
        "span_rank": [Options("auto"), Interval(int, 1)],
        "normalize": [Boolean()],
        "rank_rtol": [Interval(float, 0, 1, closed="neither")],
        "allow_incomplete": [Boolean()],
        "force": [Boolean()],
    }


Settings = TextSpanSettings
