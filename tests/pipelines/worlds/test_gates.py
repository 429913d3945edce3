"""The gate report of `python -m clipscope.pipelines.worlds.shapes.gates`: each gate reads its numbers and its
threshold (here the shipped model's measurements of 2026-11-30, then the same with each failing gate mended)."""

from __future__ import annotations

import copy

import pytest

from clipscope.pipelines.worlds.shapes import gates

SHIPPED = {
    "checkpoint": "shipped",
    "nn": {"L3H3": {"colour": 0.385, "shape": 0.154}, "L3H2": {"colour": 0.547, "shape": 0.164},
           "L2H2": {"colour": 0.078, "shape": 0.138}, "L3H0": {"colour": 0.227, "shape": 0.156}},
    "nn_colours": {"colour": 0.948, "shape": 0.464}, "text_red": 1.0,
    "topic": {"topic": 0.191, "attention": 0.524, "n": 50}, "contrast": {"correct": 0.932, "n": 14},
    "roles": ["colours", "colours", "shapes", "shapes"], "association": (0.625, 0.0625),
    "segment": {"tokens": 0.561, "random": 0.265}, "r1": {"trained": (4, 0.50), "random": (3, 0.55)},
    "neurons": {"neurons": 0.528, "neurons-random": 0.454, "neurons-reference": 0.403},
    "concepts": {1: {"hits": 0.547, "permuted": 0.324, "permuted_max": 0.371},
                 2: {"hits": 0.520, "permuted": 0.338, "permuted_max": 0.387}},
    "spurious": {"baseline": 0.02, "chosen": 0.96, "random_best": 0.32},
}
FAILING = ["shape head L2H2", "shape head L3H0", "topic map", "oracle colour units"]


def test_the_shipped_measurements_hold_twelve_gates_and_name_the_four_that_fail():
    text = gates.report(SHIPPED)
    assert text.splitlines()[-1] == "12 of 16 gates hold"
    failing = [line for line in text.splitlines() if line.endswith("FAILS")]
    assert len(failing) == 4 and all(any(name in line for line in failing) for name in FAILING)
    assert "0.191 vs attention 0.524 (50 scenes)" in text and "4/8 (best r 0.50) vs 3/8 (0.55)" in text


def test_mended_numbers_make_every_gate_hold():
    mended = copy.deepcopy(SHIPPED)
    mended["nn"]["L2H2"] = mended["nn"]["L3H0"] = {"colour": 0.15, "shape": 0.6}
    mended["topic"] = {"topic": 0.6, "attention": 0.52, "n": 50}
    mended["r1"] = {"trained": (7, 0.8), "random": (1, 0.5)}
    assert gates.report(mended).splitlines()[-1] == "16 of 16 gates hold"


@pytest.mark.parametrize("path, value", [
    (("nn", "L3H2", "shape"), 0.3),  # a colour head whose neighbours share the shape too
    (("concepts", 1, "permuted_max"), 0.5),  # concepts no better than permuted γ
    (("spurious", "random_best"), 0.9),  # a random head set does as well
    (("neurons", "neurons-random"), 0.51),  # random neurons nearly as good
])
def test_one_number_past_its_threshold_fails_its_gate(path, value):
    changed = copy.deepcopy(SHIPPED)
    target = changed
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert gates.report(changed).splitlines()[-1] == "11 of 16 gates hold"


def test_a_missing_checkpoint_is_refused(tmp_path, capsys):
    assert gates.main(["--checkpoint", str(tmp_path / "nope.safetensors")]) == 2
    assert "--checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_measuring_the_shipped_model_gives_these_numbers(tmp_path):
    from clipscope.pipelines.worlds.shapes.train import CHECKPOINT

    got = gates.measure(str(CHECKPOINT), tmp_path, log=lambda line: None)
    assert gates.report(got).splitlines()[-1] == "12 of 16 gates hold"
    assert got["roles"] == SHIPPED["roles"] and got["r1"]["trained"][0] == 4 and got["r1"]["random"][0] == 3
    for key in ("topic", "neurons"):
        for name, value in SHIPPED[key].items():
            assert got[key][name] == pytest.approx(value, abs=1e-3), (key, name)
    for layer in (1, 2):
        assert got["concepts"][layer]["hits"] == pytest.approx(SHIPPED["concepts"][layer]["hits"], abs=1e-3)
