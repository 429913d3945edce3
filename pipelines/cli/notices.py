"""Warnings every command shows the same way: results of random-init weights."""

from __future__ import annotations

import logging
from typing import Any

from clipscope.pipelines.models.loading import is_random_init, random_init_text

_shown: set[str] = set()


logger = logging.getLogger("clipscope.cli")


def warn_if_random_init(model: dict[str, Any] | None) -> bool:
    """Log the random-init warning (stderr), once per process; True when the model is random-init."""
    if not is_random_init(model):
        return False
    text = random_init_text(model)
    if text not in _shown:
        _shown.add(text)
        logger.warning("%s", text)
    return True
