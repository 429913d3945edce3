"""Parameters declared as data, validated in one place (scikit-learn's `_parameter_constraints`).

A settings dataclass lists, per parameter, the constraints a value may satisfy (any one suffices)::

    @dataclass(frozen=True)
    class TextSpanSettings(Validated):
        basis_size: int = 10
        span_rank: int | str = "auto"
        parameter_constraints: ClassVar = {"basis_size": [Interval(int, 1)],
                                           "span_rank": [Options("auto"), Interval(int, 1)]}

and `Validated.__post_init__` raises one `ParameterError` naming the parameter
(``basis_size must be an integer ≥ 1, got 0``); the CLI turns the name into its flag (``--basis-size``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from clipscope.errors import ParameterError


class Constraint:
    """One admissible kind of value."""

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fmt(number: float) -> str:
    return f"{number:g}" if isinstance(number, float) else str(number)


@dataclasses.dataclass(frozen=True)
class Interval(Constraint):
    """An integer (`kind=int`) or a real number (`kind=float`, finite) in [low, high]; an open end
    with `closed` "left" (low ≤ x < high), "right", "neither" or "both" (the default)."""

    kind: type
    low: float | None = None
    high: float | None = None
    closed: str = "both"

    def accepts(self, value: Any) -> bool:
        if self.kind is int and not _is_integer(value):
            return False
        if self.kind is float and (not _is_real(value) or not math.isfinite(float(value))):
            return False
        left_closed, right_closed = self.closed in ("both", "left"), self.closed in ("both", "right")
        if self.low is not None and (value < self.low or (value == self.low and not left_closed)):
            return False
        return not (self.high is not None and (value > self.high or (value == self.high and not right_closed)))

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a number"
        lo_closed, hi_closed = self.closed in ("both", "left"), self.closed in ("both", "right")
        if self.low is not None and self.high is not None:
            if self.kind is int and lo_closed and hi_closed:
                return f"{noun} in {_fmt(self.low)}..{_fmt(self.high)}"
            return f"{noun} in {'[' if lo_closed else '('}{_fmt(self.low)}, {_fmt(self.high)}{']' if hi_closed else ')'}"
        if self.low is not None:
            return f"{noun} {'≥' if lo_closed else '>'} {_fmt(self.low)}"
        if self.high is not None:
            return f"{noun} {'≤' if hi_closed else '<'} {_fmt(self.high)}"
        return noun


@dataclasses.dataclass(frozen=True, init=False)
class Options(Constraint):
    """One of a few literal values."""

    values: tuple[Any, ...]
    text: str | None = None

    def __init__(self, *values: Any, text: str | None = None):
        object.__setattr__(self, "values", tuple(values))
        object.__setattr__(self, "text", text)

    def accepts(self, value: Any) -> bool:
        return any(value == v and type(value) is type(v) for v in self.values)

    def describe(self) -> str:
        if self.text is not None:
            return self.text
        shown = [repr(v) for v in self.values]
        return shown[0] if len(shown) == 1 else "one of " + ", ".join(shown)


class Boolean(Constraint):
    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)

    def describe(self) -> str:
        return "True or False"


class Text(Constraint):
    """A string; `nonempty` refuses ""."""

    def __init__(self, nonempty: bool = True):
        self.nonempty = nonempty

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and (bool(value) or not self.nonempty)

    def describe(self) -> str:
        return "a non-empty string" if self.nonempty else "a string"


class NoneValue(Constraint):
    def accepts(self, value: Any) -> bool:
        return value is None

    def describe(self) -> str:
        return "None"


@dataclasses.dataclass(frozen=True)
class Each(Constraint):
    """A sequence (not a string) whose every item satisfies `item`; `min_len` items at least."""

    item: Constraint
    min_len: int = 0

    def accepts(self, value: Any) -> bool:
        return (isinstance(value, Sequence) and not isinstance(value, str) and len(value) >= self.min_len
                and all(self.item.accepts(v) for v in value))

    def describe(self) -> str:
        noun = self.item.describe()
        for article in ("an ", "a "):
            noun = noun.removeprefix(article)
        least = f"at least {self.min_len} " if self.min_len else ""
        noun = noun.replace('integer', 'integers').replace('number', 'numbers').replace('string', 'strings')
        return f"a sequence of {least}{noun}"


def check_parameter(name: str, value: Any, constraints: Sequence[Constraint]) -> None:
    """Raise ParameterError(name) unless `value` satisfies one of `constraints`."""
    if not any(c.accepts(value) for c in constraints):
        wanted = " or ".join(c.describe() for c in constraints)
        raise ParameterError(name, f"must be {wanted}, got {value!r}")


def validate_parameters(constraints: Mapping[str, Sequence[Constraint]], values: Mapping[str, Any]) -> None:
    """Check every declared parameter present in `values`, in declaration order."""
    for name, allowed in constraints.items():
        if name in values:
            check_parameter(name, values[name], allowed)


class Validated:
    """Mixin for settings dataclasses: `parameter_constraints` are checked after `__init__`."""

    parameter_constraints: ClassVar[Mapping[str, Sequence[Constraint]]] = {}

    def __post_init__(self) -> None:
        validate_parameters(self.parameter_constraints,
                            {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})  # type: ignore[arg-type]
