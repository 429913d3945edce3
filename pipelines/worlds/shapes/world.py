"""The shapes world: generated images of coloured shapes with planted, known truth.

Each image holds 1–3 objects on a textured, low-saturation background. An object has a shape
(`SHAPES`), a colour (`COLOURS`), a size (`SIZES`) and a position (a cell of a 3×3 grid,
`POSITIONS`); objects of one image sit in distinct cells and differ in (colour, shape). Object 0
is the *main object*: its size is the largest of the image, it is drawn on top, it is named
first in the caption, and its colour × shape is the class label (`LABELS`,
``label = colour_index * len(SHAPES) + shape_index``).

Geometry. By default images are 48 px and objects sit exactly on their cell's centre, which is a
patch corner of an 8-px-patch ViT (`clipscope-shapes`): every object then covers its 2×2 patches
the same way wherever it is, and a ViT this small learns shape within a CPU-minutes budget
(measured: with centres jittered by ±6% of a cell, supervised shape accuracy after 400 steps
drops from 91% to 79%, and with ±12% a contrastive run learnt no shape at all in 100k images).
`position_jitter` and `radius_jitter` restore variety where a task wants it.

A sample as written to a webdataset shard::

    __key__    "shapes-s{seed}-{index:08d}"
    png        the RGB image
    mask.png   one byte per pixel: 0 = background, k = visible pixels of object k−1 (occlusion applied)
    txt        a caption from one of several templates (`CAPTION_TEMPLATES`)
    cls        the class label (int)
    json       every attribute: objects (shape, colour, rgb, size, position, cell, center, radius,
               bbox, visible area, mask value), count, background, caption template, config

Determinism: sample `index` of world `seed` depends on (seed, index, config) only — never on
which other samples are generated — so shards can be written in any order or in parallel.
Rasterisation is numpy on each object's bounding box with 2×2 supersampling (anti-aliased
edges; a pixel belongs to an object's mask when the object covers at least half of it).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import re
import struct
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from clipscope.errors import ConfigError

GENERATOR_VERSION = 1

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 25),
    "yellow": (240, 215, 30),
    "green": (35, 165, 55),
    "cyan": (30, 200, 215),
    "blue": (35, 65, 220),
    "purple": (140, 45, 195),
    "pink": (245, 115, 185),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross", "heart")
# Object radius as a fraction of a grid cell's side, per size name.
SIZES: dict[str, float] = {"small": 0.30, "medium": 0.40, "large": 0.50}
GRID = 3
# (row, column) → name, row-major over the 3×3 grid; and the phrase a caption uses.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)
POSITION_PHRASES: dict[str, str] = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "stripes", "checker", "blobs")
LABELS: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)

# Caption templates: name → format string over the main object (and, for several objects, the
# list of all of them). Some name only part of the attributes, so single-attribute prompts
# ("a red shape", "a star") are in-distribution for zero-shot classification.
SINGLE_TEMPLATES: dict[str, str] = {
    "colour_shape": "{a} {colour} {shape}",
    "size_colour_shape": "{a} {size} {colour} {shape}",
    "colour_shape_position": "{a} {colour} {shape} {where}",
    "full": "{a} {size} {colour} {shape} {where}",
    "colour_only": "{a} {colour} shape",
    "shape_only": "{a} {shape}",
    "shape_position": "{a} {shape} {where}",
}
MULTI_TEMPLATES: dict[str, str] = {
    "list": "{listing}",
    "count_list": "{count} shapes: {listing}",
    "count_only": "{count} shapes",
    "main_and_others": "{a} {colour} {shape} and {others}",
    "list_positions": "{listing_where}",
}
CAPTION_TEMPLATES: tuple[str, ...] = tuple(SINGLE_TEMPLATES) + tuple(MULTI_TEMPLATES)
# What each template states, as (attributes named per described object, which objects are described).
_TEMPLATE_CLAIMS: dict[str, tuple[tuple[str, ...], str]] = {
    "colour_shape": (("colour", "shape"), "main"),
    "size_colour_shape": (("size", "colour", "shape"), "main"),
    "colour_shape_position": (("colour", "shape", "position"), "main"),
    "full": (("size", "colour", "shape", "position"), "main"),
    "colour_only": (("colour",), "main"),
    "shape_only": (("shape",), "main"),
    "shape_position": (("shape", "position"), "main"),
    "list": (("colour", "shape"), "all"),
    "count_list": (("colour", "shape"), "all"),
    "count_only": ((), "none"),
    "main_and_others": (("colour", "shape"), "main"),
    "list_positions": (("colour", "shape", "position"), "all"),
}
CAPTION_PREFIXES: tuple[str, ...] = ("", "a photo of ", "an image of ")


def article(word: str) -> str:
    """The indefinite article English puts before `word` ("an orange", "a red")."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


# Zero-shot prompts (open_clip convention: callables over a class name; the classifier averages
# the normalised text embeddings of all templates). Kept next to the caption templates they
# mirror.
COLOUR_PROMPTS = (
    lambda c: f"{with_article(c)} shape",
    lambda c: f"a photo of {with_article(c)} shape",
    lambda c: f"an image of {with_article(c)} shape",
)
SHAPE_PROMPTS = (
    lambda s: with_article(s),
    lambda s: f"a photo of {with_article(s)}",
    lambda s: f"an image of {with_article(s)}",
)
LABEL_PROMPTS = (
    lambda name: with_article(name),
    lambda name: f"a photo of {with_article(name)}",
    lambda name: f"an image of {with_article(name)}",
)
COUNT_PROMPTS = (lambda n: f"{n} shapes",)


@dataclass(frozen=True)
class WorldConfig:
    """What a world looks like; part of every sample's JSON so a shard says how it was made."""

    image_size: int = 48
    counts: tuple[int, ...] = (1, 2, 3)
    noise: float = 3.0  # σ of per-pixel Gaussian noise, in 0..255 units
    colour_jitter: int = 12  # per-object uniform RGB jitter, ± this much per channel
    position_jitter: float = 0.0  # object centre: cell centre ± this fraction of the cell side
    radius_jitter: float = 0.05  # object radius: nominal size × (1 ± this)

    def validated(self) -> "WorldConfig":
        size = self.image_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 32:
            raise ConfigError(f"image_size must be an integer ≥ 32, got {size!r}")
        counts = tuple(self.counts)
        if not counts or any(isinstance(c, bool) or c not in COUNT_WORDS for c in counts):
            raise ConfigError(f"counts must be a non-empty subset of (1, 2, 3), got {self.counts!r}")
        if not isinstance(self.noise, (int, float)) or not 0 <= self.noise <= 50:
            raise ConfigError(f"noise must be a number in [0, 50], got {self.noise!r}")
        if isinstance(self.colour_jitter, bool) or not isinstance(self.colour_jitter, int) or not 0 <= self.colour_jitter <= 40:
            raise ConfigError(f"colour_jitter must be an integer in [0, 40], got {self.colour_jitter!r}")
        for name, high in (("position_jitter", 0.25), ("radius_jitter", 0.25)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
                raise ConfigError(f"{name} must be a number in [0, {high}], got {value!r}")
        return WorldConfig(image_size=size, counts=tuple(sorted(set(counts))), noise=float(self.noise),
                           colour_jitter=self.colour_jitter, position_jitter=float(self.position_jitter),
                           radius_jitter=float(self.radius_jitter))


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    rgb: tuple[int, int, int]
    size: str
    position: str
    cell: tuple[int, int]  # (row, column) in the 3×3 grid
    center: tuple[float, float]  # (x, y) in pixels, origin at the top-left corner of the image
    radius: float  # pixels
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), half-open, clipped to the image
    area: int  # visible pixels in the mask
    mask_value: int  # this object's value in the mask image

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One generated sample, in memory (arrays, not encoded bytes)."""

    key: str
    image: np.ndarray = field(repr=False)  # [height width 3] uint8
    mask: np.ndarray = field(repr=False)  # [height width] uint8, 0 = background, k = object k−1
    objects: tuple[ShapeObject, ...]
    caption: str
    template: str
    background: dict
    label: int
    claim: dict  # what the caption states: {"count": n, "objects": [{attribute: value}, …]}

    @property
    def main(self) -> ShapeObject:
        return self.objects[0]

    def object_mask(self, index: int) -> np.ndarray:
        """[height width] bool: the visible pixels of object `index` (0 = main object)."""
        return self.mask == self.objects[index].mask_value

    def attributes(self, config: WorldConfig, seed: int, index: int) -> dict:
        """Everything known about the sample, JSON-ready."""
        return {
            "label": self.label,
            "label_name": LABELS[self.label],
            "caption": self.caption,
            "caption_template": self.template,
            "caption_claim": self.claim,
            "count": len(self.objects),
            "objects": [{name: getattr(o, name) for name in _OBJECT_FIELDS} for o in self.objects],
            "background": self.background,
            "image_size": config.image_size,
            "seed": seed,
            "index": index,
            "generator_version": GENERATOR_VERSION,
            "config": {**asdict(config), "counts": list(config.counts)},
        }


_OBJECT_FIELDS = tuple(f.name for f in fields(ShapeObject))


# ----------------------------------------------------------------------------------------------
# Rasterisation: each shape is an inside-test on normalised coordinates (u right, v down, the
# object's radius = 1), evaluated on supersampled pixel centres. Tests take u as a row [1 w] and v
# as a column [h 1] and broadcast, so a polygon's edge crossings are found once per row.


@dataclass(frozen=True)
class _Polygon:
    x0: np.ndarray  # [edge]
    y0: np.ndarray
    y1: np.ndarray
    slope: np.ndarray  # dx/dy; 0 for horizontal edges, which never count as crossings

    @classmethod
    def of(cls, verts: np.ndarray) -> "_Polygon":
        x0, y0 = verts[:, 0], verts[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        dy = np.where(y1 == y0, 1.0, y1 - y0)
        return cls(x0, y0, y1, np.where(y1 == y0, 0.0, (x1 - x0) / dy))

    def inside(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Even-odd rule: count the edges crossed by the ray from each point towards +u."""
        vv = v.reshape(-1, 1)  # [h 1]
        crosses = (self.y0 > vv) != (self.y1 > vv)  # [h edge]
        x_at = np.where(crosses, self.x0 + (vv - self.y0) * self.slope, -np.inf)
        return (u.reshape(1, -1, 1) < x_at[:, None, :]).sum(-1) % 2 == 1


def _regular(n: int, radius: float, start_deg: float) -> np.ndarray:
    angles = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], 1)


# Vertices (u, v) of the polygonal shapes, in the object's normalised coordinates.
POLYGON_VERTICES: dict[str, np.ndarray] = {
    "triangle": _regular(3, 1.12, -90.0) + np.array([0.0, 0.26]),  # centred on its bounding box
    "diamond": _regular(4, 1.05, -90.0),
    "star": np.stack([_regular(5, 1.08, -90.0), _regular(5, 0.46, -54.0)], 1).reshape(10, 2),
}
_POLYGONS = {name: _Polygon.of(verts) for name, verts in POLYGON_VERTICES.items()}


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    x2, y = (u * 1.2) ** 2, -v * 1.2 + 0.15
    return (x2 + y * y - 1.0) ** 3 - x2 * y**3 <= 0.0


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.32) & (av <= 0.95)) | ((av <= 0.32) & (au <= 0.95))


SHAPE_TESTS = {
    "circle": lambda u, v: u * u + v * v <= 0.9**2,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,
    "triangle": _POLYGONS["triangle"].inside,
    "diamond": _POLYGONS["diamond"].inside,
    "star": _POLYGONS["star"].inside,
    "cross": _cross,
    "heart": _heart,
}
_SUPERSAMPLE = 2
_OFFSETS = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE


def coverage(shape: str, center: tuple[float, float], radius: float, bbox: tuple[int, int, int, int]) -> np.ndarray:
    """Fraction of each pixel of `bbox` covered by the shape, [y1−y0, x1−x0] float32 in [0, 1]."""
    x0, y0, x1, y1 = bbox
    s = _SUPERSAMPLE
    u = ((np.arange(x0, x1)[:, None] + _OFFSETS).reshape(1, -1) - center[0]) / radius
    v = ((np.arange(y0, y1)[:, None] + _OFFSETS).reshape(-1, 1) - center[1]) / radius
    inside = np.broadcast_to(SHAPE_TESTS[shape](u, v), (v.shape[0], u.shape[1]))
    return inside.reshape(y1 - y0, s, x1 - x0, s).mean((1, 3), dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# Backgrounds: low saturation, so an object's colour is never the background's.


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict]:
    """[size size 3] float32 background in 0..255 and its description."""
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    level, delta, angle, period_frac = rng.uniform((45.0, 25.0, 0.0, 0.0), (210.0, 60.0, np.pi, 1.0))
    tints = rng.uniform(-14.0, 14.0, 6)
    if not 0 <= level + delta <= 255 or (rng.integers(2) and 0 <= level - delta):
        delta = -delta
    base = np.clip(level + tints[:3], 0, 255).astype(np.float32)
    other = np.clip(level + delta + tints[3:], 0, 255).astype(np.float32)
    info = {"kind": kind, "base_rgb": [int(round(c)) for c in base], "other_rgb": [int(round(c)) for c in other]}
    if kind == "plain":
        return np.broadcast_to(base, (size, size, 3)).copy(), info
    coords = np.arange(size, dtype=np.float32) + 0.5
    if kind == "blobs":  # smooth random field: a coarse grid, bilinearly upsampled
        up = _upsampler(size)
        weight = up @ rng.uniform(0.0, 1.0, (5, 5)).astype(np.float32) @ up.T
    elif kind == "checker":
        period = max(2.0, size * (1 / 16 + period_frac * (1 / 6 - 1 / 16)))
        cells = (coords // period).astype(np.int32)
        weight = ((cells[:, None] + cells[None, :]) % 2).astype(np.float32)
    else:
        proj = coords[None, :] * np.float32(np.cos(angle)) + coords[:, None] * np.float32(np.sin(angle))  # [y x]
        if kind == "gradient":
            weight = (proj - proj.min()) / (proj.max() - proj.min())
        else:  # stripes
            half_period = size * (0.09 + period_frac * 0.13) / 2
            weight = (np.floor(proj / np.float32(half_period)) % 2).astype(np.float32)
    info["period_or_angle"] = round(float(period_frac if kind in ("stripes", "checker") else angle), 6)
    return base + weight[..., None] * (other - base), info


@functools.lru_cache(maxsize=8)
def _upsampler(size: int) -> np.ndarray:
    """[size 5] bilinear interpolation weights from a 5-point grid to `size` points."""
    pos = np.linspace(0.0, 4.0, size)
    i0 = np.minimum(pos.astype(int), 3)
    frac = pos - i0
    up = np.zeros((size, 5), np.float32)
    up[np.arange(size), i0] = 1 - frac
    up[np.arange(size), i0 + 1] += frac
    return up


@functools.lru_cache(maxsize=8)
def _noise_bank(size: int) -> np.ndarray:
    """A fixed field of standard normal noise that images crop their sensor noise from (cheap)."""
    return np.random.default_rng(1234567).standard_normal((2 * size, 2 * size, 3), dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# Scenes


def _objects_for(rng: np.random.Generator, config: WorldConfig) -> list[dict]:
    count = int(config.counts[rng.integers(len(config.counts))])
    cells = rng.choice(GRID * GRID, size=count, replace=False)
    sizes = sorted(rng.integers(len(SIZES), size=count).tolist(), reverse=True)  # main object largest
    colours, shapes = list(COLOURS), SHAPES
    seen: set[tuple[int, int]] = set()
    drawn = []
    for k in range(count):
        while True:
            pair = (int(rng.integers(len(colours))), int(rng.integers(len(shapes))))
            if pair not in seen:
                seen.add(pair)
                break
        drawn.append({"colour": colours[pair[0]], "shape": shapes[pair[1]], "size": list(SIZES)[sizes[k]],
                      "cell": int(cells[k])})
    return drawn


def render(index: int, seed: int, config: WorldConfig = WorldConfig()) -> Scene:
    """Sample `index` of the world `seed` (a pure function of its arguments)."""
    rng = np.random.default_rng([GENERATOR_VERSION, seed, index])
    size = config.image_size
    image, background = _background(rng, size)
    plan = _objects_for(rng, config)
    count = len(plan)
    cell_px = size / GRID
    # Per object: centre jitter (x, y) in cells and a radius factor; RGB jitter.
    pj, rj = config.position_jitter, config.radius_jitter
    geometry = rng.uniform((-pj, -pj, 1 - rj), (pj, pj, 1 + rj), (count, 3))
    rgb_jitter = rng.integers(-config.colour_jitter, config.colour_jitter + 1, (count, 3))
    mask = np.zeros((size, size), np.uint8)
    placed = []
    for k, obj in enumerate(plan):
        row, col = divmod(obj["cell"], GRID)
        cx, cy = (col + 0.5 + geometry[k, 0]) * cell_px, (row + 0.5 + geometry[k, 1]) * cell_px
        radius = SIZES[obj["size"]] * cell_px * geometry[k, 2]
        reach = radius * 1.1
        bbox = (max(0, int(cx - reach)), max(0, int(cy - reach)),
                min(size, int(np.ceil(cx + reach))), min(size, int(np.ceil(cy + reach))))
        rgb = np.clip(np.asarray(COLOURS[obj["colour"]]) + rgb_jitter[k], 0, 255)
        placed.append((obj, (row, col), (float(cx), float(cy)), float(radius), rgb, bbox))
    # Draw back to front so the main object (k = 0) ends on top.
    for k in range(count - 1, -1, -1):
        obj, _, center, radius, rgb, (x0, y0, x1, y1) = placed[k]
        alpha = coverage(obj["shape"], center, radius, (x0, y0, x1, y1))
        patch = image[y0:y1, x0:x1]
        patch += alpha[..., None] * (rgb.astype(np.float32) - patch)
        mask[y0:y1, x0:x1][alpha >= 0.5] = k + 1
    if config.noise > 0:
        oy, ox = rng.integers(0, size + 1, 2)
        image += np.float32(config.noise) * _noise_bank(size)[oy:oy + size, ox:ox + size]
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    areas = np.bincount(mask.ravel(), minlength=count + 1)
    objects = tuple(
        ShapeObject(
            shape=obj["shape"], colour=obj["colour"], rgb=tuple(int(c) for c in rgb), size=obj["size"],
            position=POSITIONS[obj["cell"]], cell=cell, center=(round(center[0], 4), round(center[1], 4)),
            radius=round(radius, 4), bbox=bbox, area=int(areas[k + 1]), mask_value=k + 1,
        )
        for k, (obj, cell, center, radius, rgb, bbox) in enumerate(placed)
    )
    caption, template = _caption(rng, objects)
    main = objects[0]
    label = _COLOUR_INDEX[main.colour] * len(SHAPES) + SHAPES.index(main.shape)
    return Scene(key=sample_key(seed, index), image=image, mask=mask, objects=objects, caption=caption,
                 template=template, background=background, label=label, claim=caption_claim(template, objects))


_COLOUR_INDEX = {name: i for i, name in enumerate(COLOURS)}


def sample_key(seed: int, index: int) -> str:
    return f"shapes-s{seed}-{index:08d}"


def _describe(obj: ShapeObject, *, where: bool = False) -> str:
    text = with_article(f"{obj.colour} {obj.shape}")
    return f"{text} {POSITION_PHRASES[obj.position]}" if where else text


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


_ARTICLE_SLOT = "\x00"


def _caption(rng: np.random.Generator, objects: Sequence[ShapeObject]) -> tuple[str, str]:
    templates = SINGLE_TEMPLATES if len(objects) == 1 else MULTI_TEMPLATES
    name = list(templates)[rng.integers(len(templates))]
    prefix = CAPTION_PREFIXES[rng.integers(len(CAPTION_PREFIXES))]
    return prefix + caption_text(name, objects), name


def caption_text(template: str, objects: Sequence[ShapeObject]) -> str:
    """The caption of `template` (a key of SINGLE_TEMPLATES / MULTI_TEMPLATES) about `objects`."""
    main, others = objects[0], len(objects) - 1
    fields = {
        "colour": main.colour, "shape": main.shape, "size": main.size, "where": POSITION_PHRASES[main.position],
        "count": COUNT_WORDS[len(objects)],
        "listing": _join([_describe(o) for o in objects]),
        "listing_where": _join([_describe(o, where=True) for o in objects]),
        "others": f"{COUNT_WORDS.get(others, str(others))} other shape{'s' if others != 1 else ''}",
    }
    pattern = (SINGLE_TEMPLATES if len(objects) == 1 else MULTI_TEMPLATES)[template]
    text = pattern.format(a=_ARTICLE_SLOT, **fields)
    return re.sub(_ARTICLE_SLOT + r" (\w+)", lambda m: f"{article(m.group(1))} {m.group(1)}", text)


def extra_captions(scene: Scene, seed: int, index: int, n: int) -> list[tuple[str, dict]]:
    """`n` further captions of sample `index` of world `seed` (as COCO's several captions per image),
    from templates other than the sample's own while they last; (caption, claim) pairs."""
    rng = np.random.default_rng([GENERATOR_VERSION, seed, index, 1])
    names = [t for t in (SINGLE_TEMPLATES if len(scene.objects) == 1 else MULTI_TEMPLATES) if t != scene.template]
    order = [names[i] for i in rng.permutation(len(names))]
    out = []
    for k in range(n):
        name = order[k % len(order)]
        prefix = CAPTION_PREFIXES[rng.integers(len(CAPTION_PREFIXES))]
        out.append((prefix + caption_text(name, scene.objects), caption_claim(name, scene.objects)))
    return out


def caption_claim(template: str, objects: Sequence[ShapeObject]) -> dict:
    """What a caption of `template` about `objects` states: the object count and the attributes it
    names of the objects it describes (every caption states the count, explicitly or as "a …")."""
    attributes, which = _TEMPLATE_CLAIMS[template]
    described = {"main": objects[:1], "all": objects, "none": ()}[which]
    return {"count": len(objects), "objects": [{a: getattr(o, a) for a in attributes} for o in described]}


def claim_holds(claim: dict, objects: Sequence[ShapeObject]) -> bool:
    """True when the caption's statement is true of an image with `objects`: same count, and the
    described objects can be matched to distinct objects having the named attributes."""
    if claim["count"] != len(objects):
        return False
    wanted = claim["objects"]
    fits = [[all(getattr(o, a) == v for a, v in d.items()) for o in objects] for d in wanted]
    return any(all(fits[i][p] for i, p in enumerate(perm)) for perm in itertools.permutations(range(len(objects)), len(wanted)))


def claim_matrix(scenes: Sequence[Scene], claims: Sequence[dict] | None = None) -> np.ndarray:
    """[caption image] bool: claim i (default: scene i's own caption's) is true of scene j."""
    claims = [s.claim for s in scenes] if claims is None else claims
    out = np.zeros((len(claims), len(scenes)), bool)
    cache: dict[str, np.ndarray] = {}
    for i, claim in enumerate(claims):
        key = json.dumps(claim, sort_keys=True)
        if key not in cache:
            cache[key] = np.array([claim_holds(claim, other.objects) for other in scenes])
        out[i] = cache[key]
    return out


def generate_scenes(n: int, seed: int, *, start: int = 0, config: WorldConfig = WorldConfig()) -> Iterator[Scene]:
    """Scenes `start`, …, `start + n − 1` of world `seed`, in memory."""
    config = config.validated()
    for name, value, low in (("n", n, 0), ("start", start, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer ≥ {low}, got {value!r}")
    for index in range(start, start + n):
        yield render(index, seed, config)


def encode_png(array: np.ndarray, level: int = 1) -> bytes:
    """A PNG of a [h w 3] RGB or [h w] grey uint8 array (no filtering; zlib at `level`).

    Written directly (signature, IHDR, one IDAT, IEND): 10× faster than PIL's encoder on small
    images, and the same bytes for the same pixels on every platform with the same zlib.
    """
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ConfigError(f"encode_png takes a [h w 3] or [h w] uint8 array, got {array.dtype} {array.shape}")
    height, width = array.shape[:2]
    rows = np.zeros((height, 1 + array[0].size), np.uint8)  # filter byte 0 (none) per row
    rows[:, 1:] = array.reshape(height, -1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2 if array.ndim == 3 else 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), level))
            + chunk(b"IEND", b""))


def to_sample(scene: Scene, *, seed: int, index: int, config: WorldConfig) -> dict:
    """The webdataset sample dict of a scene (members in a fixed order)."""
    return {
        "__key__": scene.key,
        "png": encode_png(scene.image),
        "mask.png": encode_png(scene.mask),
        "txt": scene.caption,
        "cls": scene.label,
        "json": scene.attributes(config, seed, index),
    }


def world_config(image_size: int = 48, **options) -> WorldConfig:
    """A validated `WorldConfig`; `options` are its other fields (counts, noise, jitters, …)."""
    known = {f.name for f in fields(WorldConfig)} - {"image_size"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown world option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "counts" in options:
        options["counts"] = tuple(options["counts"])
    return WorldConfig(image_size=image_size, **options).validated()


def generate(n: int, seed: int, *, image_size: int = 48, start: int = 0, **options) -> Iterator[dict]:
    """`n` webdataset samples (``__key__``, ``png``, ``mask.png``, ``txt``, ``cls``, ``json``) of world
    `seed`, starting at sample `start`; `options` are further `WorldConfig` fields (e.g. counts)."""
    config = world_config(image_size, **options)
    for offset, scene in enumerate(generate_scenes(n, seed, start=start, config=config)):
        yield to_sample(scene, seed=seed, index=start + offset, config=config)


def scene_arrays(scenes: Sequence[Scene]) -> tuple[np.ndarray, np.ndarray]:
    """Stack scenes into ([batch height width 3] uint8 images, [batch height width] uint8 masks)."""
    return np.stack([s.image for s in scenes]), np.stack([s.mask for s in scenes])


def write_world(
    out_dir: str | os.PathLike, n_shards: int, per_shard: int, seed: int, *, image_size: int = 48, **options
) -> list[str]:
    """Write shards ``shapes-{k:05d}.tar`` (shard k holds samples k·per_shard …) and a ``world.json``."""
    from clipscope.pipelines.data.webdataset_input import write_shard

    for name, value in (("n_shards", n_shards), ("per_shard", per_shard)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer ≥ 1, got {value!r}")
    config = world_config(image_size, **options)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for shard in range(n_shards):
        path = os.path.join(os.fspath(out_dir), f"shapes-{shard:05d}.tar")
        scenes = generate_scenes(per_shard, seed, start=shard * per_shard, config=config)
        write_shard(path, (to_sample(scene, seed=seed, index=shard * per_shard + i, config=config)
                           for i, scene in enumerate(scenes)))
        paths.append(path)
    world = {
        "seed": seed, "n_shards": n_shards, "per_shard": per_shard, "generator_version": GENERATOR_VERSION,
        "config": {**asdict(config), "counts": list(config.counts)}, "labels": list(LABELS),
        "colours": list(COLOURS), "shapes": list(SHAPES), "sizes": list(SIZES), "positions": list(POSITIONS),
        "shards": [os.path.basename(p) for p in paths],
    }
    with open(os.path.join(os.fspath(out_dir), "world.json"), "w") as fh:
        json.dump(world, fh, indent=1, sort_keys=True)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    defaults = WorldConfig()
    parser = argparse.ArgumentParser(prog="python -m clipscope.pipelines.worlds.shapes.world",
                                     description="Write the shapes world as webdataset shards.")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--counts", type=int, nargs="+", default=list(defaults.counts), help="object counts to draw from")
    parser.add_argument("--position-jitter", type=float, default=defaults.position_jitter)
    parser.add_argument("--radius-jitter", type=float, default=defaults.radius_jitter)
    args = parser.parse_args(argv)
    began = time.perf_counter()
    try:
        paths = write_world(args.out, args.shards, args.per_shard, args.seed, image_size=args.image_size,
                            counts=args.counts, position_jitter=args.position_jitter, radius_jitter=args.radius_jitter)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - began
    total = args.shards * args.per_shard
    print(f"wrote {total} samples in {len(paths)} shards to {args.out} ({total / seconds:.0f} samples/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
