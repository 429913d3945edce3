"""`clipscope demo` (the README's main command) on a small world: every output is written, the
methods find what the shapes world planted, and a rerun resumes instead of re-extracting."""

import numpy as np
import pyarrow.csv as pacsv
import pytest
from PIL import Image

from clipscope.pipelines import cli
from clipscope.pipelines.worlds.shapes.demo import PROPERTIES, DemoConfig, run_demo

OUTPUTS = ("report.txt", "textspan.csv", "head_roles.png", "ablations.csv", "ablations.png", "neurons.csv",
           "token_maps.png")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert cli.main(["demo", "--out", str(out), "--shards", "2", "--per-shard", "96"]) == 0
    return out


def test_demo_writes_every_output(demo):
    for name in OUTPUTS:
        assert (demo / name).stat().st_size > 0, name
    for name in ("head_roles.png", "ablations.png", "token_maps.png"):
        with Image.open(demo / name) as image:
            assert min(image.size) >= 100, name
    report = (demo / "report.txt").read_text()
    assert "192 images" in report and "trained checkpoint" in report


def test_demo_finds_the_planted_roles_and_readout(demo):
    roles = {}  # property → best head share, from the report's table
    for line in (demo / "report.txt").read_text().splitlines():
        words = line.split()
        if words and words[0] in PROPERTIES and words[-1].endswith("%"):
            roles[words[0]] = int(words[2].rstrip("%,")) / 100
    assert set(roles) == set(PROPERTIES)
    assert roles["shapes"] >= 0.4 and roles["colours"] >= 0.3, roles
    ablations = pacsv.read_csv(demo / "ablations.csv").to_pydict()
    acc = dict(zip(ablations["ablation"], ablations["accuracy"]))
    assert acc["keep_last_2"] >= 0.8 * acc["baseline"], acc
    assert acc["heads_to_L3"] < 0.5 * acc["baseline"], acc
    textspan = pacsv.read_csv(demo / "textspan.csv").to_pydict()
    assert np.all(np.asarray(textspan["explained_ratio"]) >= -1e-9)


def test_demo_rerun_resumes(demo, capsys):
    report = (demo / "report.txt").read_text()
    result = run_demo(DemoConfig(out=str(demo), shards=2, per_shard=96))
    assert result["summary"].done == 0 and result["summary"].skipped == 2
    assert (demo / "report.txt").read_text().splitlines()[2:] == report.splitlines()[2:]


def test_demo_reports_the_applications(demo):
    report = (demo / "report.txt").read_text()
    assert "Spurious cue (shapes-spurious" in report and "worst group: baseline" in report
    assert "Neuron segmentation (layers 1–2" in report and "random neurons" in report
    with Image.open(demo / "applications" / "neuron_segmentation.png") as image:
        assert min(image.size) >= 100
