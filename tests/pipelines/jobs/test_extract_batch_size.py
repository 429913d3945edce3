"""`--batch-size auto`: the choice from free memory (with a fake memory probe), the per-image
estimate, the measured slope, and an extraction that uses it."""

from __future__ import annotations

import logging

import pytest
import torch

from clipscope.errors import ConfigError
from clipscope.kernels.decompose import DecomposeRequest, decompose
from clipscope.pipelines.jobs.extract import batch_size as bs
from clipscope.storage.store import RunStore

from extract_helpers import TINY_MODEL, extract_args, run_cli

MiB, GiB = 2**20, 2**30
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def fake_probe(free: int, total: int = 141 * GiB):
    seen = []

    def probe(device):
        seen.append(device)
        return free, total

    probe.seen = seen
    return probe


def test_choose_batch_size_arithmetic(caplog):
    assert bs.choose_batch_size(10 * GiB, 10 * MiB, cap=1024) == 816  # ⌊0.8·1024⌋ = 819 → multiple of 8
    assert bs.choose_batch_size(100 * GiB, 10 * MiB, cap=1024) == 1024
    assert bs.choose_batch_size(100 * GiB, 10 * MiB, cap=500) == 496
    assert bs.choose_batch_size(50 * MiB, 10 * MiB, cap=1024) == 4  # below 8: not rounded
    assert bs.choose_batch_size(10 * GiB, 10 * MiB, cap=1024, reserve=0.5) == 512
    with caplog.at_level(logging.WARNING):
        assert bs.choose_batch_size(5 * MiB, 10 * MiB, cap=1024) == 1
    assert "only 5.0 MiB are free" in caplog.text
    with pytest.raises(ConfigError, match="per_image_bytes must be ≥ 1"):
        bs.choose_batch_size(GiB, 0, cap=8)
    with pytest.raises(ConfigError, match=r"reserve must be in \[0, 1\)"):
        bs.choose_batch_size(GiB, 1, cap=8, reserve=1.0)


def test_auto_follows_the_probed_free_memory(model_cache):
    spec = model_cache(TINY_MODEL, 0).spec
    request = DecomposeRequest()
    per_image = bs.estimated_bytes_per_image(spec, request, torch.float32)
    probe = fake_probe(free=int(per_image * 100 / 0.8))
    assert bs.resolve_batch_size("auto", spec, request, torch.float32, CUDA, probe=probe) == 96
    assert probe.seen == [CUDA]
    # Less free memory, fewer images; half the bytes per value in bfloat16, twice the images.
    assert bs.resolve_batch_size("auto", spec, request, torch.float32, CUDA, probe=fake_probe(int(per_image * 20 / 0.8))) == 16
    assert bs.resolve_batch_size("auto", spec, request, torch.bfloat16, CUDA, probe=fake_probe(int(per_image * 20 / 0.8))) == 40
    # A huge GPU is capped; on CPU the cap is CPU_CAP.
    assert bs.resolve_batch_size("auto", spec, request, torch.float32, CUDA, probe=fake_probe(10**15)) == bs.GPU_CAP
    assert bs.resolve_batch_size("auto", spec, request, torch.float32, CPU, probe=fake_probe(10**15)) == bs.CPU_CAP
    # A measured per-image cost replaces the estimate.
    assert bs.resolve_batch_size("auto", spec, request, torch.float32, CUDA, probe=fake_probe(GiB), per_image=8 * MiB) == 96
    # A number passes through; anything else is refused naming the parameter.
    assert bs.resolve_batch_size(7, spec, request, torch.float32, CUDA, probe=fake_probe(1)) == 7
    with pytest.raises(ConfigError, match="batch_size must be an integer ≥ 1 or 'auto', got 0"):
        bs.resolve_batch_size(0, spec, request, torch.float32, CPU)


def test_the_estimate_grows_with_the_request_and_covers_the_outputs(model_cache):
    spec = model_cache(TINY_MODEL, 0).spec
    last = spec.n_layers - 1
    plain = DecomposeRequest()
    rich = DecomposeRequest(second_order_layers=(1,), token_layers=(last,), activation_layers=(2,))
    small = bs.estimated_bytes_per_image(spec, plain, torch.float32)
    big = bs.estimated_bytes_per_image(spec, rich, torch.float32)
    assert big > small
    assert bs.estimated_bytes_per_image(spec, plain, torch.bfloat16) * 2 == pytest.approx(small, rel=0.01)
    # At least every byte the forward hands back, per image.
    out = decompose(spec, torch.randn(2, 3, *spec.image_size), rich)
    returned = [out.image_embedding, out.tokens, *vars(out.direct).values(), *out.activations.values(),
                *(t for terms in out.second_order.values() for t in vars(terms).values() if t is not None)]
    per_image = sum(t.numel() * t.element_size() for t in returned) / 2
    assert big >= per_image


def test_measured_slope_with_a_fake_peak():
    calls = []

    def forward(n):
        calls.append(n)

    def peak(fn):
        fn()
        return 1000 + 300 * calls[-1]  # a fixed cost plus 300 bytes an image

    assert bs.measured_bytes_per_image(forward, CUDA, sizes=(4, 8), peak=peak) == 300
    assert calls == [4, 8]
    with pytest.raises(ConfigError, match="probe sizes"):
        bs.measured_bytes_per_image(forward, CUDA, sizes=(8, 4), peak=peak)


def test_host_memory_reads_proc_meminfo():
    free, total = bs.host_memory(CPU)
    assert 0 < free <= total


def test_extract_with_batch_size_auto(tiny_dataset, fast_models, split_store, tmp_path, monkeypatch, capsys):
    chosen = []
    real = bs.resolve_batch_size

    def spy(*args, **kwargs):
        chosen.append(real(*args, **kwargs))
        return chosen[-1]

    # The extractor probes host memory on CPU: pretend only room for ~3 images is left.
    from clipscope.pipelines.jobs.extract import job

    spec = fast_models(TINY_MODEL).spec
    cost = bs.estimated_bytes_per_image(spec, job.build_request(job.ExtractConfig(data=("x",), out="y")), torch.float32)
    monkeypatch.setattr(bs, "host_memory", lambda device: (int(cost * 3.5 / 0.8), 64 * GiB))
    monkeypatch.setattr(job, "resolve_batch_size", spy)
    out = tmp_path / "auto.zarr"
    argv = [a if a != "4" or i != 9 else "auto" for i, a in enumerate(extract_args(tiny_dataset.pattern, out))]
    assert argv[8:10] == ["--batch-size", "auto"]
    assert run_cli(*argv) == 0
    assert chosen == [3]
    store = RunStore.open(str(out), "r")
    assert store.read("valid").sum() == sum(tiny_dataset.counts) - len(tiny_dataset.corrupt)


def test_the_cli_refuses_a_bad_batch_size(tiny_dataset, tmp_path, capsys):
    argv = [a if a != "4" or i != 9 else "many" for i, a in enumerate(extract_args(tiny_dataset.pattern, tmp_path / "x"))]
    with pytest.raises(SystemExit) as caught:
        run_cli(*argv)
    assert caught.value.code == 2
    assert "expected a number of images or 'auto', got 'many'" in capsys.readouterr().err


def test_decode_threads_default_per_device():
    from clipscope.pipelines.jobs.extract.job import decode_threads
    from clipscope.pipelines.jobs.extract.settings import ExtractConfig

    config = ExtractConfig(data=("x",), out="y")
    assert decode_threads(config, CPU) == 1
    assert 1 <= decode_threads(config, CUDA) <= 8
    assert decode_threads(ExtractConfig(data=("x",), out="y", decode_threads=5), CPU) == 5


def test_several_decode_threads_change_no_byte(tiny_dataset, fast_models, split_store, tmp_path):
    """Ordered decoding on 3 threads writes the store the 1-thread run wrote, byte for byte."""
    import numpy as np
    import zarr

    out = tmp_path / "threads.zarr"
    extras = ("--second-order-layers", "1", "--token-layers", "3", "--activation-layers", "2")  # split_store's
    assert run_cli(*extract_args(tiny_dataset.pattern, out, *extras, "--decode-threads", "3")) == 0
    mine, theirs = zarr.open_group(str(out), mode="r"), zarr.open_group(split_store, mode="r")
    names = sorted(RunStore.open(split_store, "r").array_names(per_sample=True))
    assert "direct/heads" in names and "valid" in names
    for name in names:
        a, b = np.asarray(mine[name][...]), np.asarray(theirs[name][...])
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
