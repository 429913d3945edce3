"""`--batch-size auto`: the number of images per forward, chosen from the device's free memory.

    batch = clamp(⌊(1 − reserve) · free / per_image⌋, 1, cap), rounded down to a multiple of 8 when ≥ 8

`per_image` is the forward's peak memory per image. `estimated_bytes_per_image` gives it from
the model's shape, the request and the forward dtype (the activations a decomposition forward
holds at its peak, kernels/decompose.py, doubled for temporaries); on CUDA
`measured_bytes_per_image` replaces the estimate with the slope of the allocator's peak between
two small probe batches. `free` comes from a memory probe, ``(free, total)`` bytes of a device:
`cuda_memory` (`torch.cuda.mem_get_info`) or `host_memory` (MemAvailable of /proc/meminfo);
tests inject a fake one. On CPU the batch is capped at `CPU_CAP` (bigger batches do not run faster
there, they only hold more memory).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch

from clipscope.errors import ConfigError
from clipscope.kernels.decompose import DecomposeRequest
from clipscope.kernels.vit import ViTSpec

logger = logging.getLogger(__name__)

MemoryProbe = Callable[[torch.device], tuple[int, int]]

RESERVE = 0.2  # fraction of free memory left alone (allocator fragmentation, other processes)
GPU_CAP = 1024
CPU_CAP = 32
TEMPORARIES = 2.0  # the estimate's factor for short-lived copies (layer norm outputs, einsum operands)


def cuda_memory(device: torch.device) -> tuple[int, int]:
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def host_memory(device: torch.device) -> tuple[int, int]:
    """(MemAvailable, MemTotal) of /proc/meminfo in bytes; sysconf's free pages elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if ":" in line}
        return fields["MemAvailable"], fields["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


def default_probe(device: torch.device) -> MemoryProbe:
    return cuda_memory if device.type == "cuda" else host_memory


def estimated_bytes_per_image(spec: ViTSpec, request: DecomposeRequest, dtype: torch.dtype,
                              heads_layers: Sequence[int] | None = None) -> int:
    """Peak bytes one image costs a `decompose` forward of `request` in `dtype` (an upper estimate)."""
    t, w, n, h, e, n_layers = spec.n_tokens, spec.width, spec.mlp_width, spec.n_heads, spec.embed_dim, spec.n_layers
    stored_layers = n_layers if heads_layers is None else len(heads_layers)
    # One block's working set: residual, its layer norm, q/k/v, attention output, the full attention
    # scores, the MLP's pre- and post-activation values.
    transient = 6 * t * w + 2 * h * t * t + 2 * t * n
    # Kept across blocks: class-token rows of every layer (attention, MLP, token 0 attended from itself),
    # the sources of second-order layers, per-token attention of token layers, activation maps.
    kept = 3 * n_layers * w + len(request.second_order_layers) * t * n
    kept += len(request.token_layers) * 2 * t * w + len(request.activation_layers) * t * n
    outputs = e * (3 + stored_layers * (h + 2)) + len(request.token_layers) * h * t * e * 2
    outputs += sum((n_layers - layer - 1) * h * n for layer in request.second_order_layers)
    outputs += len(request.activation_layers) * t * n
    images = 3 * spec.image_size[0] * spec.image_size[1]
    itemsize = torch.empty((), dtype=dtype).element_size()
    return int(TEMPORARIES * itemsize * (transient + kept + outputs + images))


def measured_bytes_per_image(forward: Callable[[int], object], device: torch.device, sizes: tuple[int, int] = (4, 8),
                             peak: Callable[[Callable[[], object]], int] | None = None) -> int:
    """Peak-memory slope between two probe batches: (peak(b) − peak(a)) / (b − a) bytes per image.

    `forward(n)` runs one forward of n images; `peak(fn)` runs fn and returns the peak bytes it
    allocated (default: the CUDA allocator's, reset before each probe)."""
    a, b = sizes
    if not 0 < a < b:
        raise ConfigError(f"probe sizes must be 0 < a < b, got {sizes}")
    measure = peak or (lambda fn: _cuda_peak(fn, device))
    low, high = measure(lambda: forward(a)), measure(lambda: forward(b))
    return max(int((high - low) / (b - a)), 1)


def _cuda_peak(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - start)


def choose_batch_size(free_bytes: int, per_image_bytes: int, *, cap: int, reserve: float = RESERVE) -> int:
    """Images per forward that fit in (1 − reserve) · free_bytes; at least 1, at most `cap`."""
    if per_image_bytes < 1:
        raise ConfigError(f"per_image_bytes must be ≥ 1, got {per_image_bytes}")
    if not 0 <= reserve < 1:
        raise ConfigError(f"reserve must be in [0, 1), got {reserve}")
    fits = int((1 - reserve) * max(free_bytes, 0) // per_image_bytes)
    if fits < 1:
        logger.warning("one image needs ~%.1f MiB but only %.1f MiB are free; running 1 image per forward",
                       per_image_bytes / 2**20, free_bytes / 2**20)
        return 1
    batch = min(fits, cap)
    return batch - batch % 8 if batch >= 8 else batch


def resolve_batch_size(requested: int | str, spec: ViTSpec, request: DecomposeRequest, dtype: torch.dtype,
                       device: torch.device, *, heads_layers: Sequence[int] | None = None,
                       probe: MemoryProbe | None = None,
                       per_image: int | None = None) -> int:
    """`requested` when it is a number; for ``"auto"`` the choice of the module docstring, from
    `probe(device)` (default: `default_probe(device)`) and `per_image` (default: the estimate)."""
    if requested != "auto":
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ConfigError("{batch_size} must be an integer ≥ 1 or 'auto', got %r" % (requested,),
                              parameters=("batch_size",))
        return requested
    free, _ = (probe or default_probe(device))(device)
    cost = per_image if per_image is not None else estimated_bytes_per_image(spec, request, dtype, heads_layers)
    batch = choose_batch_size(free, cost, cap=GPU_CAP if device.type == "cuda" else CPU_CAP)
    logger.info("--batch-size auto: %d images per forward (%.1f MiB each, %.1f GiB free on %s)", batch,
                cost / 2**20, free / 2**30, device.type)
    return batch
