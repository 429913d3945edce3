"""Parameters are declared once (clipscope.params): the Python API names the parameter, the CLI its flag."""

from __future__ import annotations

import pathlib
import pickle
import re

import pytest

from clipscope.errors import ConfigError, ParameterError, StoreError
from clipscope.params import Boolean, Each, Interval, NoneValue, Options, check_parameter

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("constraints, value, message", [
    ([Interval(int, 1)], 0, "p must be an integer ≥ 1, got 0"),
    ([Interval(int, 1)], True, "p must be an integer ≥ 1, got True"),
    ([Interval(int, 1, 4)], 5, "p must be an integer in 1..4, got 5"),
    ([Interval(float, 0, 1, closed="right")], 0.0, "p must be a number in (0, 1], got 0.0"),
    ([Interval(float, 0)], float("nan"), "p must be a number ≥ 0, got nan"),
    ([Options("auto"), Interval(int, 1)], "x", "p must be 'auto' or an integer ≥ 1, got 'x'"),
    ([Options("a", "b")], "c", "p must be one of 'a', 'b', got 'c'"),
    ([Options("a", "b", text="a or b")], "c", "p must be a or b, got 'c'"),
    ([NoneValue(), Each(Interval(int, 0))], (1, "x"), "p must be None or a sequence of integers ≥ 0, got (1, 'x')"),
    ([Boolean()], 1, "p must be True or False, got 1"),
])
def test_constraint_messages(constraints, value, message):
    with pytest.raises(ParameterError) as caught:
        check_parameter("p", value, constraints)
    assert str(caught.value) == message
    assert caught.value.message_for({"p": "--p"}) == "-" + "-" + message
    assert caught.value.parameter == "p"


@pytest.mark.parametrize("value", [1, 7])
def test_accepted_values_pass(value):
    check_parameter("p", value, [Interval(int, 1)])


def test_errors_survive_pickling_with_their_parameters():
    err = pickle.loads(pickle.dumps(ParameterError("basis_size", "must be an integer ≥ 1, got {0}")))
    assert str(err) == "basis_size must be an integer ≥ 1, got {0}"
    assert err.message_for({"basis_size": "--basis-size"}) == "--basis-size must be an integer ≥ 1, got {0}"
    plain = pickle.loads(pickle.dumps(StoreError("x")))
    assert str(plain) == "x" and plain.message_for({"x": "--y"}) == "x"


def test_settings_name_the_parameter():
    from clipscope.pipelines.jobs.extract.settings import ExtractConfig
    from clipscope.pipelines.jobs.second_order.settings import SecondOrderSettings
    from clipscope.pipelines.jobs.textspan import TextSpanSettings

    with pytest.raises(ConfigError, match="^basis_size must be an integer ≥ 1, got 0$"):
        TextSpanSettings(basis_size=0)
    with pytest.raises(ConfigError, match="^span_rank must be 'auto' or an integer ≥ 1, got 0$"):
        TextSpanSettings(span_rank=0)
    with pytest.raises(ConfigError, match="^top_k must be an integer ≥ 1, got 0$"):
        SecondOrderSettings(1, top_k=0)
    with pytest.raises(ConfigError, match="^chunks_per_block must be an integer ≥ 1, got 0$"):
        SecondOrderSettings(1, chunks_per_block=0)
    with pytest.raises(ConfigError, match="^rows_per_chunk must be an integer ≥ 1, got -4$"):
        ExtractConfig(data=("a.tar",), out="o", rows_per_chunk=-4)
    with pytest.raises(ConfigError, match=r"^token_layers must be a sequence of integers ≥ 0, got \(1, 'x'\)$"):
        ExtractConfig(data=("a.tar",), out="o", token_layers=(1, "x"))


def test_the_cli_names_the_flag(capsys):
    from clipscope.pipelines.cli import main

    assert main(["textspan", "/nonexistent-store", "--basis-size", "0"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert err == ["clipscope textspan: error: --basis-size must be an integer ≥ 1, got 0"]
    assert main(["second-order", "/nonexistent-store", "--layer", "1", "--top-k", "0"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert err == ["clipscope second-order: error: --top-k must be an integer ≥ 1, got 0"]


def test_no_library_error_starts_with_a_flag():
    """Errors raised outside pipelines/cli name parameters, never command-line flags."""
    pattern = re.compile(r"""Error\(\s*f?["']-{1,2}[a-z]""")
    offenders = []
    for folder in ("clipscope", "kernels", "storage", "cluster", "pipelines"):
        for path in (ROOT / folder).rglob("*.py"):
            if "cli" in path.relative_to(ROOT).parts:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
