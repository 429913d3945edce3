"""The CLIP-InterpreT analyses, head roles and zero-shot segmentation on the shapes world: what the
shipped shapes CLIP's heads and tokens mean, measured against the planted truth (the meaning gates of
tests/pipelines/worlds/test_interpret_gates.py), and the demo's section (a roles heat map, a topic and a
contrastive overlay, the segmentation table).

Truth comes from the world itself: a store row's key names its scene (`world.render(index, seed)`), whose
objects have known colours, shapes and masks; the main object's colour × shape is the row's label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipscope.kernels.segmentation_metrics import foreground, normalise
from clipscope.pipelines.models.loading import LoadedModel
from clipscope.pipelines.query import interpret
from clipscope.pipelines.worlds.shapes import world
from clipscope.storage import schema
from clipscope.storage.store import RunStore

# The demo's heads (TextSpan of the shipped model): colour heads L3H3, L3H2; shape heads L2H2, L3H0.
COLOUR_HEAD = (3, 3)
SHAPE_HEAD = (2, 2)
TOPIC_HEAD = (3, 2)  # the colour head whose topic maps are not sign-flipped for red (L3H3 ranks cyan first for "red")


@dataclass(frozen=True)
class Row:
    row: int
    scene: world.Scene


def scenes_of(store: RunStore, seed: int, config: world.WorldConfig | None = None) -> list[Row]:
    """The valid rows of a shapes-world store with their scenes (rendered again from the keys)."""
    samples = store.read_samples().to_pydict()
    valid = store.read_valid()
    config = config or world.WorldConfig(image_size=int((store.attrs.get("model_spec") or {}).get("image_size",
                                                                                                  [48])[0]))
    out = []
    for row, key in zip(samples["row"], samples["key"]):
        if valid[row]:
            out.append(Row(row, world.render(int(key.rsplit("-", 1)[-1]), seed, config)))
    return out


def _attribute(obj: world.ShapeObject, what: str) -> str:
    return obj.colour if what == "colour" else obj.shape


def neighbour_agreement(store: RunStore, rows: Sequence[Row], heads: Sequence[tuple[int, int]], *, k: int = 8,
                        queries: int = 48) -> dict[str, float]:
    """Mean share of the top-k neighbours (by ρ of `heads`) whose main object has the query's colour / shape."""
    by_row = {r.row: r.scene for r in rows}
    hits = {"colour": [], "shape": []}
    for query in rows[:queries]:
        table = interpret.property_neighbours(store, heads=list(heads), sample=query.row, k=k)
        found = [by_row[r].main for r in table["row"].to_pylist()]
        for what in hits:
            hits[what].append(np.mean([_attribute(o, what) == _attribute(query.scene.main, what) for o in found]))
    return {what: float(np.mean(values)) for what, values in hits.items()}


def text_precision(store: RunStore, rows: Sequence[Row], head: tuple[int, int], colour: str, *, k: int = 8,
                   loaded: LoadedModel | None = None) -> float:
    """Share of the top-k images for the text `colour` on `head` whose main object has that colour."""
    by_row = {r.row: r.scene for r in rows}
    _, table = interpret.head_text_neighbours(store, *head, text=colour, k=k, loaded=loaded)
    return float(np.mean([by_row[r].main.colour == colour for r in table["row"].to_pylist()]))


def _binary_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[background, foreground] intersection and union counts."""
    return (np.array([(~pred & ~truth).sum(), (pred & truth).sum()]),
            np.array([(~pred | ~truth).sum(), (pred | truth).sum()]))


def _protocol(pixels: np.ndarray) -> np.ndarray:
    import torch

    norm = normalise(torch.from_numpy(np.asarray(pixels, np.float64))[None], clip=False)
    return foreground(norm)[0].numpy()


def topic_localisation(store: RunStore, rows: Sequence[Row], head: tuple[int, int], colour: str = "red", *,
                       loaded: LoadedModel | None = None, baseline: bool = False) -> dict[str, float]:
    """On scenes of 2–3 objects with one `colour` object: mIoU (the protocol: min–max, > mean, accumulated over
    the scenes) of the topic map of "a {colour} shape" on `head` against that object's mask, and the same for
    the head's raw class-token attention. `baseline`: the map minus the mean map of "a {c} shape" over every
    colour c of the world."""
    layer, head_index = head
    attention_name = schema.ATTENTION.path(layer=layer)
    picked = [r for r in rows if len(r.scene.objects) >= 2 and [o.colour for o in r.scene.objects].count(colour) == 1]
    direction = interpret.unit_text(store, f"a {colour} shape", loaded)[None]
    others = (np.stack([interpret.unit_text(store, f"a {c} shape", loaded) for c in world.COLOURS]) if baseline
              else None)
    totals = {"topic": np.zeros((2, 2)), "attention": np.zeros((2, 2))}
    (gh, gw), size = interpret.grid_shape(store)
    for r in picked:
        index = [o.colour for o in r.scene.objects].index(colour)
        truth = r.scene.object_mask(index)
        topic = interpret.topic_maps(store, [colour], sample=r.row, layer=layer, head=head_index,
                                     directions=direction, baseline=others)[0]
        attention = store.read(attention_name, [r.row])[0, head_index, 1:].astype(np.float64).reshape(gh, gw)
        import torch

        from clipscope.kernels.segmentation_metrics import upsample

        raw = upsample(torch.from_numpy(attention)[None], size)[0].numpy()
        for name, pixels in (("topic", topic.pixels), ("attention", raw)):
            inter, union = _binary_iou(_protocol(pixels), truth)
            totals[name] += np.stack([inter, union])
    return {name: float(np.mean(t[0] / np.maximum(t[1], 1))) for name, t in totals.items()} | {"n": len(picked)}


def contrast_sign(store: RunStore, rows: Sequence[Row], first: str = "red", second: str = "blue", *,
                  head: tuple[int, int] | None = COLOUR_HEAD, loaded: LoadedModel | None = None) -> dict[str, float]:
    """On scenes with one `first` and one `second` object: the share of those objects' pixels where
    D = m_first − m_second has the right sign (> 0 on the first object, < 0 on the second)."""
    picked = [r for r in rows if [o.colour for o in r.scene.objects].count(first) == 1
              and [o.colour for o in r.scene.objects].count(second) == 1]
    directions = np.stack([interpret.unit_text(store, t, loaded) for t in (first, second)])
    right = total = 0
    layer, head_index = head if head is not None else (None, None)
    for r in picked:
        maps = interpret.topic_maps(store, [first, second], sample=r.row, layer=layer, head=head_index,
                                    directions=directions)
        d = maps[0].pixels - maps[1].pixels
        colours = [o.colour for o in r.scene.objects]
        on_first, on_second = r.scene.object_mask(colours.index(first)), r.scene.object_mask(colours.index(second))
        right += int((d[on_first] > 0).sum() + (d[on_second] < 0).sum())
        total += int(on_first.sum() + on_second.sum())
    return {"correct": right / max(total, 1), "n": len(picked)}


def demo_section(store: RunStore, loaded: LoadedModel, out: Path, *, seed: int, task: str = "shapes",
                 executor=None) -> list[str]:
    """The demo's CLIP-InterpreT section: roles (heat map), a topic and a contrastive overlay, the segmentation
    table. Returns the report's lines (they name the PNGs written under `out`)."""
    from clipscope.pipelines.jobs import roles, segment
    from clipscope.pipelines.query.interpret_figures import input_picture, plot_contrast, plot_topic, sample_image

    files = []
    role = roles.run(store, roles.Settings(), executor)
    roles.report.plot_roles(role, out / "roles_heatmap.png")
    files.append("roles_heatmap.png")
    rows = scenes_of(store, seed)
    example = next(r for r in rows if [o.colour for o in r.scene.objects].count("red") == 1
                   and [o.colour for o in r.scene.objects].count("blue") == 1)
    picture = input_picture(loaded, sample_image(store, example.row))
    what = " + ".join(f"{o.colour} {o.shape}" for o in example.scene.objects)
    layer, head = TOPIC_HEAD
    baseline = [f"a {c} shape" for c in world.COLOURS]
    topic = interpret.topic_maps(store, ["a red shape", "a blue shape"], sample=example.row, layer=layer, head=head,
                                 loaded=loaded, baseline=baseline)
    plot_topic(picture, topic, out / "topic_colour_head.png",
               labels=[f"{t.text!r} − mean over the 8 colours" for t in topic],
               title=f"Topic maps of the colour head L{layer}H{head}; scene: {what}")
    contrast = interpret.contrast_map(store, "red", "blue", sample=example.row, layer=None, head=None, loaded=loaded)
    plot_contrast(picture, contrast, out / "contrast_red_blue.png",
                  title=f"Contrast 'red' − 'blue', all layers and heads; scene: {what}")
    files += ["topic_colour_head.png", "contrast_red_blue.png"]
    results = [segment.run(store, segment.Settings(method=m, task=task, class_mode=mode, target="main"), executor,
                           loaded=loaded)
               for mode in ("label", "predicted") for m in ("tokens", "attention", "random")]
    lines = ["Head roles (`clipscope roles`: the property most of a head's first 5 TextSpan texts name):",
             roles.report.format_roles(role), "",
             "Zero-shot segmentation of the main object (`clipscope segment`; official protocol: bilinear, "
             "clip at 0 for tokens, min–max, > mean; scenes of 1–3 objects):",
             segment.report.format_segmentation(results), "",
             f"Topic / contrast overlays of the scene {what} (row {example.row}): the colour head "
             f"L{layer}H{head}'s maps of 'a red shape' and 'a blue shape' (each minus the mean over the 8 colours), "
             "and 'red' − 'blue' over all layers and heads",
             "figures of these analyses: " + ", ".join(str(out / f) for f in files)]
    return lines
