"""The shapes world's text pools and zero-shot tasks, registered with the product's registries.

`register` is the ``clipscope.plugins`` entry point (pyproject.toml): the registries of
`clipscope.pipelines.texts` call it on first use, so the product never imports the world.

Pools: shapes-colours, shapes-shapes, shapes-positions, shapes-sizes, shapes-counts (the attribute
words; option ``template``, e.g. "a {} shape") and shapes-all (all of those plus distractor words
that name nothing in the world). Tasks: shapes (colour + shape, 56 classes; the world's label),
shapes-colour (8 classes; label // 7), shapes-shape (7 classes; label % 7).
"""

from __future__ import annotations

from collections.abc import Callable

from clipscope.pipelines.texts.pools import apply_template, register_pool
from clipscope.pipelines.texts.zero_shot import ZeroShotTask, register_task
from clipscope.pipelines.worlds.shapes import world

# Words a shapes-world model has never seen in a caption about an image: TextSpan should not pick
# them for a head that encodes the planted attributes.
SHAPES_DISTRACTORS: tuple[str, ...] = (
    "dog", "cat", "car", "tree", "house", "person", "water", "mountain", "city", "flower",
    "wood", "metal", "glass", "sky", "grass", "text", "face", "night", "bird", "boat",
)


def _shapes(attribute: str) -> Callable[..., list[str]]:
    def factory(template: str | None = None) -> list[str]:
        words = {
            "colours": list(world.COLOURS),
            "shapes": list(world.SHAPES),
            "positions": list(world.POSITIONS),
            "sizes": list(world.SIZES),
            "counts": [f"{world.COUNT_WORDS[c]} shape{'s' if c != 1 else ''}" for c in sorted(world.COUNT_WORDS)],
        }[attribute]
        return apply_template(words, template)

    return factory


def _shapes_all(template: str | None = None, distractors: bool = True) -> list[str]:
    texts: list[str] = []
    for attribute in ("colours", "shapes", "positions", "sizes", "counts"):
        texts += _shapes(attribute)()
    if distractors:
        texts += list(SHAPES_DISTRACTORS)
    return apply_template(texts, template)


def _shapes_task(kind: str) -> Callable[[], ZeroShotTask]:
    def factory() -> ZeroShotTask:
        n_shapes = len(world.SHAPES)
        if kind == "label":
            return ZeroShotTask("shapes", tuple(world.LABELS), tuple(world.LABEL_PROMPTS))
        if kind == "colour":
            return ZeroShotTask("shapes-colour", tuple(world.COLOURS), tuple(world.COLOUR_PROMPTS),
                                lambda labels: labels // n_shapes)
        return ZeroShotTask("shapes-shape", tuple(world.SHAPES), tuple(world.SHAPE_PROMPTS),
                            lambda labels: labels % n_shapes)

    return factory


def register() -> None:
    """Add the world's pools and tasks to the registries (idempotent)."""
    for attribute in ("colours", "shapes", "positions", "sizes", "counts"):
        register_pool(f"shapes-{attribute}", _shapes(attribute), replace=True)
    register_pool("shapes-all", _shapes_all, replace=True)
    register_task("shapes", _shapes_task("label"), replace=True)
    register_task("shapes-colour", _shapes_task("colour"), replace=True)
    register_task("shapes-shape", _shapes_task("shape"), replace=True)
    _register_tags()
    _register_zoo()


def _register_zoo() -> None:
    """The world's Rosetta zoo models for `clipscope maps --zoo` (Rosetta Neurons)."""
    from clipscope.pipelines.jobs.maps.zoo import register_zoo_model
    from clipscope.pipelines.worlds.shapes import cnn, oracle

    register_zoo_model("shapes-oracle", oracle.oracle, replace=True)
    register_zoo_model("shapes-cnn", cnn.shapes_cnn, replace=True)
    register_zoo_model("shapes-cnn-random", cnn.shapes_cnn_random, replace=True)
    from clipscope.pipelines.worlds.shapes import spurious  # the shapes-spurious task

    spurious.register()


def _tags() -> dict[str, str]:
    """Every attribute text of the world → its property (the pool it comes from); distractors untagged."""
    tags: dict[str, str] = {}
    for attribute in ("colours", "shapes", "positions", "sizes", "counts"):
        for text in _shapes(attribute)():
            tags.setdefault(text, attribute)
    return tags


def _register_tags() -> None:
    """Property tags of the world's pools for `clipscope roles`: shapes-all, each attribute pool,
    and the demo's vocabulary."""
    from clipscope.pipelines.texts.tags import register_tags

    for pool in ("shapes-all", "shapes-vocabulary", *(f"shapes-{a}" for a in ("colours", "shapes", "positions",
                                                                              "sizes", "counts"))):
        register_tags(pool, _tags, replace=True)
