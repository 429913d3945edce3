"""The forward's float dtype, and how far a half-precision forward may stray from float32.

`--dtype` is the *storage* dtype (float16 or float32 arrays in the store). `--compute-dtype` is
the dtype the decomposition forward runs in:

- ``auto`` (default): on CUDA the storage dtype (float16 storage → float16 forward, as before this
  option existed), on CPU float32 (CPU float16 matmuls are slow and lossy: there float16 is a
  storage format only);
- ``float32``, ``bfloat16``: on any device (torch runs bfloat16 matmuls on CPU);
- ``float16``: CUDA only; asked for on CPU it is refused with one line naming the flag, not
  silently replaced, since the store's bytes would then not be what was asked for.

Whatever the forward dtype, the outputs are cast to float32 before they are written or summed, and
every streamed statistic over them (the decomposition identity here and in `benchmarks/gpu_check.py`,
the reductions' sums) is accumulated in float64 (`float64_sum`).

Exactness (docs/methods.md, "Half-precision forwards"). Deviations are measured per image relative
to that image's largest |image_embedding| coordinate (an ∞-norm relative error); terms far smaller
than the embedding carry the same *absolute* error, so their own relative error can be large.
`BOUNDS[dtype]` holds the limits the CPU tests assert on random-init ViTs (tiny and ViT-B-32 at
4 images: measured bfloat16 ≈ 1e-2 for the embedding and the identity, float16 ≈ 1.5e-3); the GPU
check reports the same quantities on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from clipscope.errors import ConfigError

COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Bound:
    """∞-norm deviations relative to max |image_embedding| of the same image, against float32.

    embedding: |e_lp − e_32|; terms: |t_lp − t_32| of every direct term (heads, MLPs, embedding);
    second_order: |q_lp − q_32| relative to max |q_32|; identity: |Σ terms − e| of the low-precision
    outputs themselves (summed in float64); cosine: the lowest cosine of e_lp with e_32.
    """

    embedding: float
    terms: float
    second_order: float
    identity: float
    cosine: float


# Unit roundoff u: bfloat16 2^-8 ≈ 3.9e-3 (8 significand bits), float16 2^-11 ≈ 4.9e-4 (11); the
# measured deviations are 2-3 u; the limits are about 10 u (3-4x the worst value measured on CPU).
BOUNDS = {
    "bfloat16": Bound(embedding=3e-2, terms=3e-2, second_order=3e-2, identity=4e-2, cosine=0.999),
    "float16": Bound(embedding=5e-3, terms=5e-3, second_order=5e-3, identity=5e-3, cosine=0.99999),
    "float32": Bound(embedding=1e-5, terms=1e-5, second_order=1e-5, identity=1e-5, cosine=0.9999999),
}


def forward_dtype(compute_dtype: str, storage_dtype: str, device: torch.device) -> torch.dtype:
    """The dtype the forward runs in on `device` (see the module docstring); ConfigError when refused."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"{{compute_dtype}} must be one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}",
                          parameters=("compute_dtype",))
    if compute_dtype == "auto":
        return getattr(torch, storage_dtype) if device.type == "cuda" else torch.float32
    if compute_dtype == "float16" and device.type != "cuda":
        raise ConfigError(
            f"{{compute_dtype}} float16 needs a CUDA device, the forward runs on {device.type} (float16 matmuls on "
            "CPU are slow and lossy); use {compute_dtype} bfloat16 or float32 there, or {device} cuda",
            parameters=("compute_dtype", "device"))
    return getattr(torch, compute_dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_output(values: Tensor, storage: np.dtype) -> np.ndarray:
    """A forward output as a numpy array of the storage dtype. On a GPU the cast happens there (half
    the bytes cross the bus when storing float16, no conversion on the CPU; bfloat16 → float16 rounds
    once, as through float32, which holds every bfloat16 exactly); on CPU through float32 and numpy."""
    if values.device.type != "cpu":
        return values.to(getattr(torch, np.dtype(storage).name)).cpu().numpy()
    return values.to(torch.float32).numpy().astype(storage)


def float64_sum(values: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    """Σ over `dim` accumulated in float64, whatever dtype `values` has."""
    return values.to(torch.float64).sum(dim)


def identity_deviation(image_embedding: Tensor, embedding: Tensor, mlps: Tensor, heads: Tensor,
                       bias: Tensor) -> Tensor:
    """Per image: max |embedding + Σ mlps + Σ heads + bias − image_embedding| / max |image_embedding|,
    in float64 (the decomposition identity of docs/methods.md; all layers' terms must be given)."""
    e = image_embedding.to(torch.float64)
    total = embedding.to(torch.float64) + float64_sum(mlps, 1) + float64_sum(heads, (1, 2)) + bias.to(torch.float64)
    return (total - e).abs().amax(-1) / e.abs().amax(-1).clamp_min(torch.finfo(torch.float64).tiny)


def relative_deviation(values: Tensor, reference: Tensor, scale: Tensor) -> float:
    """max over images of max |values − reference| / scale[image] (float64); `scale` is [image]."""
    diff = (values.to(torch.float64) - reference.to(torch.float64)).abs().reshape(values.shape[0], -1).amax(-1)
    return float((diff / scale.to(torch.float64)).max())
