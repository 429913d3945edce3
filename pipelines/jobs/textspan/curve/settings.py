"""The textspan curve's parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from clipscope.params import Boolean, Constraint, Each, Interval, NoneValue, Text, Validated
from clipscope.pipelines.texts.zero_shot import ZeroShotTask

DEFAULT_BASIS_SIZES = (10, 20, 30, 40, 50, 60)


class _BasisSizes(Constraint):
    _each = Each(Interval(int, 1), min_len=1)

    def accepts(self, value: Any) -> bool:
        return self._each.accepts(value)

    def describe(self) -> str:
        return "integers ≥ 1"


class _Task(Constraint):
    def accepts(self, value: Any) -> bool:
        return isinstance(value, ZeroShotTask)

    def describe(self) -> str:
        return "a ZeroShotTask"


@dataclass(frozen=True)
class Settings(Validated):
    """`layers`: whose heads are projected (None: the last 4 with stored head terms; they need TextSpan
    results with ≥ max(basis_sizes) picks); `task`: the zero-shot task, by name (None: shapes for the
    shapes-world model, else imagenet); `basis_sizes`: the m of the curve; `texts`: the pool TextSpan ran on,
    needed only when its embeddings are not cached in the store; `allow_incomplete`: see begin_reduction."""

    layers: tuple[int, ...] | None = None
    task: str | ZeroShotTask | None = None
    basis_sizes: tuple[int, ...] = DEFAULT_BASIS_SIZES
    texts: tuple[str, ...] | None = None
    allow_incomplete: bool = False

    parameter_constraints: ClassVar = {
        "layers": [NoneValue(), Each(Interval(int, 0), min_len=1)],
        "task": [NoneValue(), Text(), _Task()],
        "basis_sizes": [_BasisSizes()],
        "texts": [NoneValue(), Each(Text(nonempty=False), min_len=1)],
        "allow_incomplete": [Boolean()],
    }

    @property
    def sizes(self) -> tuple[int, ...]:
        """The curve's m values, sorted and without repeats."""
        return tuple(sorted({int(m) for m in self.basis_sizes}))
