"""The forward's dtype: which one runs where, the half-precision exactness bounds against float32
(checked on CPU, where torch runs bfloat16 and float16 matmuls), float64 accumulation, and a
bfloat16 extraction end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipscope.errors import ConfigError, StoreError
from clipscope.kernels.decompose import DecomposeRequest, decompose
from clipscope.pipelines.jobs.extract.job import ForwardCheck, this_forward
from clipscope.pipelines.jobs.extract.precision import (
    BOUNDS,
    float64_sum,
    forward_dtype,
    identity_deviation,
    relative_deviation,
)
from clipscope.storage.store import RunStore

from extract_helpers import TINY_MODEL, extract_args, run_cli

# The split_store fixture's options (tests/pipelines/conftest.py FULL_EXTRAS, split convention).
SPLIT_STORE_EXTRAS = ("--second-order-layers", "1", "--token-layers", "3", "--activation-layers", "2")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # forward_dtype looks at the device type only


def test_forward_dtype_per_device():
    assert forward_dtype("auto", "float32", CPU) == torch.float32
    assert forward_dtype("auto", "float16", CPU) == torch.float32  # float16 is a storage format on CPU
    assert forward_dtype("auto", "float16", CUDA) == torch.float16
    assert forward_dtype("auto", "float32", CUDA) == torch.float32
    assert forward_dtype("bfloat16", "float32", CPU) == torch.bfloat16
    assert forward_dtype("bfloat16", "float16", CUDA) == torch.bfloat16
    assert forward_dtype("float16", "float32", CUDA) == torch.float16
    assert forward_dtype("float32", "float16", CUDA) == torch.float32


def test_float16_on_cpu_is_refused_naming_the_flag():
    with pytest.raises(ConfigError) as caught:
        forward_dtype("float16", "float32", CPU)
    err = caught.value
    assert str(err).startswith("compute_dtype float16 needs a CUDA device, the forward runs on cpu")
    flags = {"compute_dtype": "--compute-dtype", "device": "--device"}
    assert "--compute-dtype bfloat16 or float32 there, or --device cuda" in err.message_for(flags)
    with pytest.raises(ConfigError, match="compute_dtype must be one of auto, float32, bfloat16, float16"):
        forward_dtype("float8", "float32", CPU)


def test_the_cli_refuses_float16_on_cpu_before_writing(tiny_dataset, fast_models, tmp_path, capsys):
    out = tmp_path / "never.zarr"
    code = run_cli(*extract_args(tiny_dataset.pattern, out, "--device", "cpu", "--compute-dtype", "float16"))
    err = capsys.readouterr().err
    assert code == 2 and "--compute-dtype float16 needs a CUDA device" in err and "--device cuda" in err
    assert not out.exists()


def _deviations(out, ref, layer: int) -> dict[str, float]:
    scale = ref.image_embedding.to(torch.float64).abs().amax(-1)
    d, r = out.direct, ref.direct
    q, q_ref = out.second_order[layer].weights, ref.second_order[layer].weights
    q_scale = q_ref.to(torch.float64).abs().reshape(q_ref.shape[0], -1).amax(-1)
    cos = torch.nn.functional.cosine_similarity(out.image_embedding.double(), ref.image_embedding.double(), dim=-1)
    return {
        "embedding": relative_deviation(out.image_embedding, ref.image_embedding, scale),
        "terms": max(relative_deviation(a, b, scale) for a, b in
                     ((d.heads, r.heads), (d.mlps, r.mlps), (d.embedding, r.embedding), (d.cls_token, r.cls_token))),
        "second_order": relative_deviation(q, q_ref, q_scale),
        "identity": float(identity_deviation(out.image_embedding, d.embedding, d.mlps, d.heads, d.bias).max()),
        "cosine": float(cos.min()),
    }


def _check_bounds(model_cache, name: str, n_images: int):
    loaded = model_cache(name, 0)
    spec = loaded.spec
    layer = spec.n_layers - 2
    request = DecomposeRequest(second_order_layers=(layer,))
    images = torch.randn(n_images, 3, *spec.image_size, generator=torch.Generator().manual_seed(3))
    ref = decompose(spec, images, request)
    found = {}
    for dtype in ("bfloat16", "float16"):
        out = decompose(spec.to(dtype=getattr(torch, dtype)), images, request)
        assert out.image_embedding.dtype == getattr(torch, dtype)  # the forward really ran in it
        dev = _deviations(out, ref, layer)
        bound = BOUNDS[dtype]
        for key in ("embedding", "terms", "second_order", "identity"):
            assert dev[key] <= getattr(bound, key), (dtype, key, dev[key])
        assert dev["cosine"] >= bound.cosine, (dtype, dev["cosine"])
        found[dtype] = dev
    float32 = _deviations(ref, ref, layer)
    assert float32["identity"] <= BOUNDS["float32"].identity
    # Not vacuous: half precision strays measurably, bfloat16 (8 mantissa bits) more than float16 (11).
    assert found["bfloat16"]["embedding"] > BOUNDS["float32"].embedding
    assert found["bfloat16"]["embedding"] > found["float16"]["embedding"]
    return found


def test_half_precision_bounds_on_the_tiny_model(model_cache):
    _check_bounds(model_cache, TINY_MODEL, 4)


@pytest.mark.slow
def test_half_precision_bounds_on_vit_b_32(model_cache):
    _check_bounds(model_cache, "ViT-B-32", 2)


def test_streamed_sums_accumulate_in_float64():
    # 4096 values of 1 + 2^-7: their sum 4128 is no bfloat16 number (spacing 32 there); float64 is exact.
    values = torch.full((4096, 3), 1 + 2**-7, dtype=torch.bfloat16)
    total = float64_sum(values, 0)
    assert total.dtype == torch.float64 and torch.equal(total, torch.full((3,), 4096 * (1 + 2**-7), dtype=torch.float64))
    # The identity's sum: exact cancellation of bfloat16 terms in float64.
    emb = torch.tensor([[1.0, -0.5]], dtype=torch.bfloat16)
    heads = torch.full((1, 3, 2, 2), 2**-8, dtype=torch.bfloat16)
    mlps = torch.zeros(1, 3, 2, dtype=torch.bfloat16)
    embedding = emb - 6 * 2**-8
    dev = identity_deviation(emb, embedding, mlps, heads, torch.zeros_like(emb))
    assert dev.dtype == torch.float64 and float(dev[0]) == 0.0


def test_a_bfloat16_extraction_stays_within_its_bounds(tiny_dataset, fast_models, split_store, tmp_path):
    out = tmp_path / "bf16.zarr"
    code = run_cli(*extract_args(tiny_dataset.pattern, out, *SPLIT_STORE_EXTRAS, "--device", "cpu",
                                 "--compute-dtype", "bfloat16"))
    assert code == 0
    half, full = RunStore.open(str(out), "r"), RunStore.open(split_store, "r")
    assert {r["forward"].get("dtype") for r in half.shard_records().values()} == {"bfloat16"}
    assert all("dtype" not in r["forward"] for r in full.shard_records().values())
    valid = full.read("valid")
    assert np.array_equal(half.read("valid"), valid)
    emb = full.read("image_embedding")[valid].astype(np.float64)
    scale = np.abs(emb).max(-1)
    bound = BOUNDS["bfloat16"]
    for name in ("image_embedding", "direct/heads", "direct/mlps", "direct/embedding"):
        diff = np.abs(half.read(name)[valid].astype(np.float64) - full.read(name)[valid].astype(np.float64))
        worst = float((diff.reshape(len(scale), -1).max(-1) / scale).max())
        limit = bound.embedding if name == "image_embedding" else bound.terms
        assert 0 < worst <= limit, (name, worst)
    heads = half.read("direct/heads")[valid].astype(np.float64)
    total = (half.read("direct/embedding")[valid].astype(np.float64) + heads.sum((1, 2))
             + half.read("direct/mlps")[valid].astype(np.float64).sum(1) + half.read("direct/bias")[valid])
    image = half.read("image_embedding")[valid].astype(np.float64)
    assert float((np.abs(total - image).max(-1) / np.abs(image).max(-1)).max()) <= bound.identity


def test_a_store_refuses_to_mix_forward_dtypes():
    check = ForwardCheck("s.zarr", [{"forward": this_forward(CPU, torch.bfloat16)}])
    check.check(this_forward(CPU, torch.bfloat16), "this run")
    with pytest.raises(StoreError, match=r"this run computes on cpu with \d+ torch thread\(s\), the done shards of "
                                         r"s.zarr on cpu with \d+ torch thread\(s\) in bfloat16"):
        check.check(this_forward(CPU), "this run")
    assert "dtype" not in this_forward(CPU)  # float32 records read as before --compute-dtype existed
