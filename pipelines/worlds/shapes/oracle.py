"""The shapes-world oracle: a "model" whose units are the world's truth (Rosetta's planted anchor, S3 item 1).

Per sample, from its mask and JSON (the `mask.png` member, or the scene re-rendered from the JSON's seed and
index — the world is a pure function of them), full-resolution coverage maps: `colour` (8 units: pixels of
objects of colour c), `shape` (7), `size` (3), `object` (1: any object), `edges` (1: the mask's boundaries),
each area-downsampled to every grid of `GRIDS` (layers ``colour_6``, ``colour_12``, ``colour_24``, …). The
three resolutions of one concept are exact synonyms, for the clustering gate.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F

from clipscope.errors import DataError
from clipscope.pipelines.jobs.maps.zoo import Network
from clipscope.pipelines.worlds.shapes import world

GRIDS = (6, 12, 24)
CONCEPTS = {"colour": tuple(world.COLOURS), "shape": world.SHAPES, "size": tuple(world.SIZES),
            "object": ("object",), "edges": ("edges",)}


def _offsets() -> dict[str, tuple[int, int]]:
    out, start = {}, 0
    for name, units in CONCEPTS.items():
        out[name] = (start, start + len(units))
        start += len(units)
    return out


OFFSETS = _offsets()
N_CHANNELS = sum(len(u) for u in CONCEPTS.values())


def truth_maps(mask: np.ndarray, objects: list[dict]) -> np.ndarray:
    """[channel, H, W] float32 coverage maps of one scene (channels in CONCEPTS order)."""
    h, w = mask.shape
    out = np.zeros((N_CHANNELS, h, w), np.float32)
    for obj in objects:
        pixels = mask == int(obj["mask_value"])
        for name, value in (("colour", obj["colour"]), ("shape", obj["shape"]), ("size", obj["size"])):
            out[OFFSETS[name][0] + CONCEPTS[name].index(value)] += pixels
    out[OFFSETS["object"][0]] = mask > 0
    edge = np.zeros((h, w), bool)
    edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    edge[:, :-1] |= mask[:, 1:] != mask[:, :-1]
    edge[1:, :] |= mask[1:, :] != mask[:-1, :]
    edge[:-1, :] |= mask[1:, :] != mask[:-1, :]
    out[OFFSETS["edges"][0]] = edge
    return out


def scene_truth(raw) -> tuple[np.ndarray, list[dict]]:
    """(mask, objects) of a shapes-world sample: its mask member when present, else the re-rendered scene."""
    meta = raw.meta or {}
    if "objects" not in meta or "seed" not in meta or "index" not in meta:
        raise DataError(f"sample {raw.key}: not a shapes-world sample (its json names no seed/index/objects)")
    objects = list(meta["objects"])
    member = (getattr(raw, "extra", None) or {}).get("mask.png")
    if member is not None:
        from PIL import Image

        with Image.open(io.BytesIO(member)) as image:
            return np.asarray(image.convert("L")), objects
    config = world.world_config(int(meta.get("image_size", 48)),
                                **{k: v for k, v in (meta.get("config") or {}).items() if k != "image_size"})
    return world.render(int(meta["index"]), int(meta["seed"]), config).mask, objects


class _Pool(torch.nn.Module):
    """One oracle layer: channels [start, stop) area-downsampled to grid × grid."""

    def __init__(self, start: int, stop: int, grid: int):
        super().__init__()
        self.start, self.stop, self.grid = start, stop, grid

    def forward(self, truth: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(truth[:, self.start:self.stop], self.grid)


class Oracle(torch.nn.Module):
    """Input: [B, channel, H, W] truth maps (its `sample_input`); layers `{concept}_{grid}`."""

    def __init__(self, grids: tuple[int, ...] = GRIDS):
        super().__init__()
        for name, (start, stop) in OFFSETS.items():
            for grid in grids:
                self.add_module(f"{name}_{grid}", _Pool(start, stop, grid))

    def forward(self, truth: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(truth).sum() for m in self.children()])


def oracle_layers(grids: tuple[int, ...] = GRIDS) -> tuple[str, ...]:
    return tuple(f"{name}_{grid}" for name in CONCEPTS for grid in grids)


def oracle(seed: int = 0, checkpoint: str | None = None) -> Network:
    """The `shapes-oracle` zoo model (no weights: `seed` and `checkpoint` do not apply)."""
    if checkpoint is not None:
        raise DataError("shapes-oracle has no weights; it takes no --checkpoint")

    def sample_input(raw, view: torch.Tensor) -> torch.Tensor:
        mask, objects = scene_truth(raw)
        truth = torch.from_numpy(truth_maps(mask, objects))
        size = tuple(view.shape[1:])
        if tuple(truth.shape[1:]) != size:  # the field of view of a square world image: a plain resize
            truth = F.adaptive_avg_pool2d(truth[None], size)[0] if truth.shape[1] % size[0] == 0 else \
                F.interpolate(truth[None], size=size, mode="area")[0]
        return truth

    return Network(Oracle(), oracle_layers(), (48, 48), sample_input=sample_input, input_channels=N_CHANNELS,
                   description={"kind": "shapes-world truth", "weights": "truth (no weights)", "concepts": {k: list(v) for k, v in CONCEPTS.items()}})
