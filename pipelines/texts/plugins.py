"""Plugins that add text pools and zero-shot tasks: the ``clipscope.plugins`` entry-point group.

Each entry point names a function of no arguments that registers what it brings
(``register_pool``, ``register_task``). The shapes world is one; a lab adds its own datasets the same
way in its package's metadata, without clipscope importing it. They load once, on the first lookup.
"""

from __future__ import annotations

from importlib.metadata import entry_points

GROUP = "clipscope.plugins"
_loaded = False


def load_plugins() -> None:
    """Call every registered plugin's function once per process."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # set first: a plugin's own lookups must not load plugins again
    for entry in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        entry.load()()
