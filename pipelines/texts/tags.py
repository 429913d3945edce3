"""Property tags of text pools: which property (colours, shapes, …) each text of a pool names.

`clipscope roles` labels a head by the tags of its TextSpan texts (spec S6). A world registers the
tags of its pools here by name (the shapes world: the pool a text comes from; its distractors stay
untagged); other pools are tagged by a file of ``text<TAB>property`` lines (`read_tag_file`).
"""

from __future__ import annotations

from collections.abc import Callable

from clipscope.errors import ConfigError, DataError, ParameterError, literal
from clipscope.pipelines.texts.plugins import load_plugins

_TAGS: dict[str, Callable[[], dict[str, str]]] = {}


def register_tags(pool: str, factory: Callable[[], dict[str, str]], *, replace: bool = False) -> None:
    """Tags of the pool named `pool`: `factory()` gives {text: property} (untagged texts left out)."""
    if pool in _TAGS and not replace:
        raise ConfigError(f"tags of pool {pool!r} are already registered (pass replace=True to override)")
    _TAGS[pool] = factory


def has_tags(pool: str) -> bool:
    load_plugins()
    return pool in _TAGS


def get_tags(pool: str) -> dict[str, str]:
    load_plugins()
    if pool not in _TAGS:
        known = ", ".join(sorted(_TAGS)) or "none"
        raise ConfigError(f"no built-in property tags for the text pool {pool!r} (built in: {known}); pass "
                          "--text-labels FILE (text<TAB>property lines) or --labels CSV (layer,head,label)")
    return dict(_TAGS[pool]())


def read_tag_file(path: str) -> dict[str, str]:
    """{text: property} from ``text<TAB>property`` lines (blank lines and lines starting with # skipped)."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as err:
        raise ParameterError("text_labels", f"{path}: cannot read it ({err.strerror or err})") from None
    tags: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0] or not parts[1].strip():
            raise DataError(f"{{text_labels}} {literal(path)} line {number}: expected text<TAB>property, got "
                            f"{literal(repr(line[:60]))}", parameters=("text_labels",))
        tags[parts[0]] = parts[1].strip()
    if not tags:
        raise DataError(f"{{text_labels}} {literal(path)} holds no text<TAB>property line", parameters=("text_labels",))
    return tags
