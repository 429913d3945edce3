"""Object masks of webdataset samples, brought to the model's input geometry (store array `masks`).

A mask member (``mask.png`` by default; any ``*.png`` or ``*.npy``) holds one integer per pixel (the
shapes world: 0 = background, k = object k−1). `extract --masks MEMBER` stores it after the same
geometric transform the model's preprocess applies to the image — open_clip's resize (shorter side,
or squash) and centre crop — with nearest-neighbour interpolation, so mask pixel (y, x) is the label
of input pixel (y, x); the colour steps (RGB conversion, to-tensor, normalisation) do not apply.
``geometry="reference"`` squashes the mask to the input size instead: the official segmentation code
does that (misaligned with the image whenever the image is not square), and it is offered to
reproduce its numbers. Rows whose sample has no mask member hold `MASK_MISSING` everywhere, and
pixels the crop pads (an image smaller than the crop) too; the metrics ignore those pixels.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from clipscope.errors import ConfigError, DataError, ParameterError

MASK_MISSING = 255
GEOMETRIES = ("preprocess", "reference")
_COLOUR_STEPS = ("MaybeConvertMode", "MaybeToTensor", "ToTensor", "Normalize", "ConvertImageDtype", "_convert_to_rgb")


def decode_mask(data: bytes, member: str) -> np.ndarray:
    """A mask member's bytes as a [height width] uint8 array (PNG: L/P/1 modes; NPY: 2-D integers 0..255)."""
    if member.rsplit(".", 1)[-1] == "npy":
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError) as err:
            raise DataError(f"mask member {member!r} is not a readable .npy file ({err})") from None
        if array.ndim != 2 or array.dtype.kind not in "iub" or (array.size and (array.min() < 0 or array.max() > 255)):
            raise DataError(f"mask member {member!r} must be a 2-D integer array with values 0..255, "
                            f"got {array.dtype} {array.shape}")
        return array.astype(np.uint8)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises many types for broken files
        raise DataError(f"mask member {member!r} is not a readable image ({type(err).__name__}: {err})") from None
    if image.mode not in ("L", "P", "1"):
        raise DataError(f"mask member {member!r} must be a one-channel image (mode L, P or 1), got mode {image.mode}")
    return np.asarray(image, dtype=np.uint8) if image.mode != "1" else np.asarray(image).astype(np.uint8)


def _resize(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize to (height, width), PIL's rule (as torchvision's on PIL images)."""
    if tuple(mask.shape) == tuple(size):
        return mask
    return np.asarray(Image.fromarray(mask).resize((size[1], size[0]), Image.NEAREST))


def _shorter_side(shape: tuple[int, int], size: int, max_size: int | None) -> tuple[int, int]:
    """torchvision Resize(int)'s output (height, width): the shorter side to `size`, the ratio kept."""
    h, w = shape
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _center_crop(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torchvision CenterCrop: pad (with MASK_MISSING) when smaller, then crop at round((h − ch)/2)."""
    ch, cw = size
    h, w = mask.shape
    if h < ch or w < cw:
        top, left = (ch - h) // 2 if h < ch else 0, (cw - w) // 2 if w < cw else 0
        padded = np.full((max(h, ch), max(w, cw)), MASK_MISSING, np.uint8)
        padded[top:top + h, left:left + w] = mask
        mask, (h, w) = padded, padded.shape
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return mask[top:top + ch, left:left + cw]


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(size)
    return (size[0], size[0]) if len(size) == 1 else (int(size[0]), int(size[1]))


def _steps(preprocess) -> list[Callable[[np.ndarray], np.ndarray]]:
    """The geometric steps of an open_clip/torchvision Compose, as functions on masks."""
    steps = []
    for t in getattr(preprocess, "transforms", [preprocess]):
        kind = getattr(t, "__name__", None) or type(t).__name__  # a plain function, else the transform's class
        if kind == "Resize":
            size, max_size = t.size, getattr(t, "max_size", None)
            if isinstance(size, int) or len(size) == 1:
                target = size if isinstance(size, int) else size[0]
                steps.append(lambda m, s=target, x=max_size: _resize(m, _shorter_side(m.shape, s, x)))
            else:
                steps.append(lambda m, s=_pair(size): _resize(m, s))
        elif kind == "CenterCrop":
            steps.append(lambda m, s=_pair(t.size): _center_crop(m, s))
        elif kind in _COLOUR_STEPS or "convert" in kind.lower():
            continue
        else:
            raise ConfigError(f"the model's preprocess has a step {kind or t!r} that clipscope cannot apply to masks; "
                              "pass --mask-geometry reference (masks squashed to the input size)")
    return steps


@dataclass(frozen=True)
class MaskReader:
    """Reads `member` of a sample and brings it to the input geometry ([height width] uint8)."""

    member: str
    image_size: tuple[int, int]
    geometry: str = "preprocess"
    preprocess: object = None

    def __post_init__(self) -> None:
        if self.geometry not in GEOMETRIES:
            raise ParameterError("mask_geometry", f"must be one of {', '.join(GEOMETRIES)}, got {self.geometry!r}")
        last = self.member.rsplit(".", 1)[-1]
        if last not in ("png", "npy"):
            raise ParameterError("masks", f"must name a .png or .npy member (such as mask.png), got {self.member!r}")
        if self.geometry == "preprocess":
            _steps(self.preprocess)  # an unsupported transform fails before any shard is read

    def transform(self, mask: np.ndarray) -> np.ndarray:
        if self.geometry == "reference":
            return _resize(mask, self.image_size)
        for step in _steps(self.preprocess):
            mask = step(mask)
        if tuple(mask.shape) != tuple(self.image_size):
            raise DataError(f"mask became {mask.shape} after the preprocess geometry, the model's input is "
                            f"{self.image_size}")
        return mask

    def read(self, extra: dict[str, bytes], key: str) -> np.ndarray:
        """The transformed mask of a sample's members (`MASK_MISSING` everywhere when it has none)."""
        data = extra.get(self.member)
        if data is None:
            return np.full(self.image_size, MASK_MISSING, np.uint8)
        try:
            return self.transform(decode_mask(data, self.member))
        except DataError as err:
            raise DataError(f"sample {key}: {err}") from None


def mask_values(masks: Sequence[np.ndarray]) -> np.ndarray:
    """The distinct labels of some masks, `MASK_MISSING` excluded (for reports)."""
    values = np.unique(np.concatenate([np.unique(m) for m in masks])) if len(masks) else np.zeros(0, np.uint8)
    return values[values != MASK_MISSING]
