"""Planned scenes of the shapes world, and the "shapes-spurious" world built from them.

`render_plan` draws a scene whose objects are given (shape, colour, size, cell) instead of drawn at random
— the world's renderer as a text-to-image model (cue mining, `cue_scene`) and for worlds that break a
correlation on purpose. Background, sensor noise and RGB jitter still come from (seed, index).

shapes-spurious: two classes whose names entangle a shape with a colour, "a blue circle" and "a red heart"
(task `shapes-spurious`, template "a {}"), and single-object test scenes of {circle, heart} × {blue, red}
in equal numbers: the label is the shape (0 = circle, 1 = heart), the group the colour (0 = blue, 1 = red),
stored under the json key `group` (`extract --group-key group`, the default). The groups "red circle" and
"blue heart" break the correlation the class names plant: a classifier that reads colour fails on them.
The pair is the one the spec's example ("a red star" vs "a blue heart") would have been, had the shipped
CLIP been fooled by it: it is not (worst group 0.99, measured), so the world uses a pair it is fooled by
(over all 1176 pairs of shapes × ordered pairs of colours, the median worst group is 0.25; this one: 0.02).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np

from clipscope.errors import ConfigError
from clipscope.pipelines.worlds.shapes import world
from clipscope.pipelines.worlds.shapes.world import (
    COLOURS,
    GRID,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    WorldConfig,
    caption_claim,
    caption_text,
    coverage,
)

SPURIOUS_SHAPES = ("circle", "heart")
SPURIOUS_COLOURS = ("blue", "red")
SPURIOUS_CLASSES = tuple(f"{c} {s}" for c, s in zip(SPURIOUS_COLOURS, SPURIOUS_SHAPES))  # blue circle, red heart
SPURIOUS_TEMPLATES = (lambda name: f"a {name}",)


def render_plan(plan: Sequence[dict], seed: int, index: int, config: WorldConfig = WorldConfig()) -> Scene:
    """A scene with the objects of `plan` (dicts with shape, colour, size, cell 0–8; object 0 is the main one,
    drawn on top), on the background and noise of sample (seed, index). Cells must be distinct."""
    if not plan:
        raise ConfigError("a plan needs at least one object")
    cells = [int(o["cell"]) for o in plan]
    if len(set(cells)) != len(cells) or not all(0 <= c < GRID * GRID for c in cells):
        raise ConfigError(f"plan cells must be distinct and in 0..{GRID * GRID - 1}, got {cells}")
    for o in plan:
        if o["shape"] not in SHAPES or o["colour"] not in COLOURS or o["size"] not in SIZES:
            raise ConfigError(f"unknown shape, colour or size in plan object {o}")
    rng = np.random.default_rng([world.GENERATOR_VERSION, seed, index, 7])
    size = config.image_size
    image, background = world._background(rng, size)
    cell_px = size / GRID
    rgb_jitter = rng.integers(-config.colour_jitter, config.colour_jitter + 1, (len(plan), 3))
    mask = np.zeros((size, size), np.uint8)
    placed = []
    for k, obj in enumerate(plan):
        row, col = divmod(int(obj["cell"]), GRID)
        cx, cy = (col + 0.5) * cell_px, (row + 0.5) * cell_px
        radius = SIZES[obj["size"]] * cell_px
        reach = radius * 1.1
        bbox = (max(0, int(cx - reach)), max(0, int(cy - reach)),
                min(size, int(np.ceil(cx + reach))), min(size, int(np.ceil(cy + reach))))
        rgb = np.clip(np.asarray(COLOURS[obj["colour"]]) + rgb_jitter[k], 0, 255)
        placed.append((obj, (row, col), (float(cx), float(cy)), float(radius), rgb, bbox))
    for k in range(len(plan) - 1, -1, -1):
        obj, _, center, radius, rgb, (x0, y0, x1, y1) = placed[k]
        alpha = coverage(obj["shape"], center, radius, (x0, y0, x1, y1))
        patch = image[y0:y1, x0:x1]
        patch += alpha[..., None] * (rgb.astype(np.float32) - patch)
        mask[y0:y1, x0:x1][alpha >= 0.5] = k + 1
    if config.noise > 0:
        oy, ox = rng.integers(0, size + 1, 2)
        image += np.float32(config.noise) * world._noise_bank(size)[oy:oy + size, ox:ox + size]
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    areas = np.bincount(mask.ravel(), minlength=len(plan) + 1)
    objects = tuple(
        ShapeObject(shape=o["shape"], colour=o["colour"], rgb=tuple(int(c) for c in rgb), size=o["size"],
                    position=POSITIONS[int(o["cell"])], cell=cell, center=center, radius=round(radius, 4), bbox=bbox,
                    area=int(areas[k + 1]), mask_value=k + 1)
        for k, (o, cell, center, radius, rgb, bbox) in enumerate(placed))
    template = "colour_shape" if len(objects) == 1 else "list"
    main = objects[0]
    label = list(COLOURS).index(main.colour) * len(SHAPES) + SHAPES.index(main.shape)
    return Scene(key=f"planned-s{seed}-{index:08d}", image=image, mask=mask, objects=objects,
                 caption=caption_text(template, objects), template=template, background=background, label=label,
                 claim=caption_claim(template, objects))


def spurious_scene(index: int, seed: int, config: WorldConfig = WorldConfig(), *,
                   shapes: Sequence[str] = SPURIOUS_SHAPES, colours: Sequence[str] = SPURIOUS_COLOURS,
                   ) -> tuple[Scene, int, int]:
    """(scene, label = shape index, group = colour index) of test sample `index`: the four (shape, colour)
    groups in turn, the size and cell drawn from (seed, index)."""
    shape, colour = divmod(index % 4, 2)
    rng = np.random.default_rng([world.GENERATOR_VERSION, seed, index, 11])
    plan = [{"shape": shapes[shape], "colour": colours[colour],
             "size": list(SIZES)[int(rng.integers(len(SIZES)))], "cell": int(rng.integers(GRID * GRID))}]
    return render_plan(plan, seed, index, config), shape, colour


def write_spurious_world(out_dir: str | os.PathLike, n_shards: int, per_shard: int, seed: int, *,
                         shapes: Sequence[str] = SPURIOUS_SHAPES, colours: Sequence[str] = SPURIOUS_COLOURS,
                         ) -> list[str]:
    """Shards `spurious-{k:05d}.tar` of the shapes-spurious test world (png, mask.png, cls = shape index,
    json with `group` = colour index and the objects); `shapes`, `colours`: another entangled pair."""
    from clipscope.pipelines.data.webdataset_input import write_shard

    config = WorldConfig().validated()
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for shard in range(n_shards):
        samples = []
        for index in range(shard * per_shard, (shard + 1) * per_shard):
            scene, label, group = spurious_scene(index, seed, config, shapes=shapes, colours=colours)
            samples.append({"__key__": f"spurious-s{seed}-{index:08d}", "png": world.encode_png(scene.image),
                            "mask.png": world.encode_png(scene.mask), "txt": scene.caption, "cls": label,
                            "json": {"group": group, "group_name": colours[group],
                                     "class_name": f"{colours[label]} {shapes[label]}",
                                     "objects": [asdict(o) for o in scene.objects]}})
        path = os.path.join(os.fspath(out_dir), f"spurious-{shard:05d}.tar")
        write_shard(path, samples)
        paths.append(path)
    return paths


def register() -> None:
    """The `shapes-spurious` zero-shot task (called by the world's plugin)."""
    from clipscope.pipelines.texts.zero_shot import ZeroShotTask, register_task

    register_task("shapes-spurious", lambda: ZeroShotTask("shapes-spurious", SPURIOUS_CLASSES, SPURIOUS_TEMPLATES),
                  replace=True)
