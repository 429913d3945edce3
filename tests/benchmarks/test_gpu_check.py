"""`benchmarks/gpu_check.py --device cpu --quick`: the GPU check's own code path on CPU, so that the
script a GPU session runs once cannot rot. Numbers are not judged here, only that every
measurement is made, recorded and consistent."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from clipscope.pipelines.jobs.extract.precision import BOUNDS

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_mode_on_cpu_measures_and_records_everything(gpu_check, tmp_path):
    out = tmp_path / "quick.json"
    data = gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == data
    assert data["meta"]["device"] == "cpu" and data["meta"]["quick"] is True
    assert data["meta"]["open_clip"]  # the loader imported it
    assert [(r["model"], r["dtype"]) for r in data["runs"]] == [("clipscope-tiny", "bfloat16"),
                                                                 ("clipscope-tiny", "float32")]
    for run in data["runs"]:
        assert "error" not in run and "not_run" not in run, run
        assert run["bare_images_per_s"] > 0 and run["decompose_images_per_s"] > 0 and run["decode_images_per_s"] > 0
        assert run["deviation"]["within_bounds"] is True
        bound = BOUNDS[run["dtype"]]
        assert run["deviation"]["identity"] <= bound.identity
        assert run["batch_size_auto"]["choice_from_estimate"] >= 1
        for variant in ("direct", "second_order"):
            ex = run[f"extract_{variant}"]
            assert "error" not in ex, ex
            assert ex["images_per_s"] > 0 and ex["steady_images"] == 16  # 24 images, the first shard warms up
            assert ex["ratio_to_bare"] == round(ex["images_per_s"] / run["bare_images_per_s"], 3)
            assert ex["identity_store"] <= bound.identity
            assert ex["forward"]["device"] == "cpu" and ex["forward"].get("dtype", "float32") == run["dtype"]
            assert ex["checksum_s_per_shard"] >= 0
            assert ex["storage_dtype"] == ("float32" if run["dtype"] == "float32" else "float16")
    rows = data["rosetta"]
    assert [r["matmul_dtype"] for r in rows][0] == "float64"
    for row in rows:
        assert row["accumulate_tflops"] > 0 and row["matmul_tflops"] > 0 and row["ratio"] > 0
    assert set(data["goals"]) == {f"rosetta_{r['matmul_dtype']}" for r in rows}  # no ViT-B-16/L-14 in quick mode
    omp = data["omp"]  # on CPU the device run is a second CPU run: the same picks, bit for bit
    assert omp["support_device"] == "cpu" and omp["picks_equal"] is True and omp["max_coef_deviation"] <= 1e-10
    assert omp["cpu_s"] > 0 and omp["device_s"] > 0


def test_without_cuda_the_gpu_mode_is_refused_in_one_line(gpu_check, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as caught:
        gpu_check.main(["--out", str(tmp_path / "x.json")])
    assert caught.value.code == 2
    assert "--device cuda: torch sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
