"""Make ``import torchvision`` (hence ``import open_clip``) work next to a CPU-only torch.

The only torchvision 0.28.0 wheel on the registry is a CUDA build. Paired with the CPU torch
wheel, its compiled extension ``_C.so`` cannot load, and torchvision's fake-tensor registrations
then fail at import time with ``RuntimeError: operator torchvision::nms does not exist``.

The fix is deliberately narrow: only when the compiled ops cannot load, declare the schemas of
the ops that torchvision registers unconditionally, before torchvision is first imported. The
declared ops have no kernels, so calling them raises a clear "no kernel" error; clipscope never
calls them (images are decoded with PIL, transforms are plain tensor ops). On a working
(CUDA or matching CPU) install nothing is touched.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import torch

# Ops whose fake implementations torchvision registers without first checking that the
# compiled library loaded (torchvision/_meta_registrations.py, 0.2x).
_UNCONDITIONAL_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

_state: dict[str, object] = {"declared": None, "library": None}


def _compiled_ops_load() -> bool:
    """True when torchvision's own compiled extension loads (or there is none to try)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True
    libs = sorted(pathlib.Path(next(iter(spec.submodule_search_locations))).glob("_C*.so"))
    if not libs:
        return True
    try:
        torch.ops.load_library(str(libs[0]))
    except OSError:
        return False
    return True


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def ensure_torchvision_importable() -> list[str]:
    """Declare the missing torchvision op schemas if (and only if) its compiled ops cannot load.

    Returns the names of the ops declared here (empty when nothing was needed). Idempotent;
    must run before the first ``import torchvision`` to have any effect.
    """
    if _state["declared"] is not None:
        return list(_state["declared"])  # type: ignore[arg-type]
    declared: list[str] = []
    if "torchvision" not in sys.modules and not _compiled_ops_load():
        missing = [name for name in _UNCONDITIONAL_SCHEMAS if not _op_exists(name)]
        if missing:
            library = torch.library.Library("torchvision", "FRAGMENT")  # noqa: TOR901
            for name in missing:
                library.define(_UNCONDITIONAL_SCHEMAS[name])
            _state["library"] = library  # keep alive: dropping it would undeclare the ops
            declared = missing
    _state["declared"] = declared
    return declared


def import_open_clip():
    """``import open_clip`` with the torchvision shim applied first."""
    ensure_torchvision_importable()
    import open_clip

    return open_clip
