"""What extraction stores besides the decomposition proper (spec S13): object masks, the
sample's group, the all-layer per-token sum and class-token attention rows.

The driver (`job.py`) calls three things: `array_specs` when it creates the store, `decomposition_arrays`
with each forward's `Decomposition`, and a `SampleExtras` per worker whose `rows(raw)` gives a sample's
rows that need no forward (its mask) and `group(raw)` its group for samples.parquet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clipscope.errors import DataError
from clipscope.kernels.decompose import Decomposition
from clipscope.kernels.vit import ViTSpec
from clipscope.pipelines.data.masks import MASK_MISSING, MaskReader
from clipscope.pipelines.jobs.extract.settings import ExtractConfig
from clipscope.storage import schema
from clipscope.storage.layout import ArraySpec

logger = logging.getLogger(__name__)


def array_specs(config: ExtractConfig, spec: ViTSpec) -> list[ArraySpec]:
    """The per-sample arrays of the options `--masks`, `--token-sum`, `--attention-layers`."""
    specs = []
    if config.masks:
        specs.append(schema.MASKS.spec(tuple(spec.image_size)))
    if config.token_sum:
        specs.append(schema.DIRECT_TOKEN_SUM.spec((spec.n_tokens, spec.embed_dim), config.dtype))
    for layer in config.attention_layers:
        specs.append(schema.ATTENTION.spec((spec.n_heads, spec.n_tokens), config.dtype, layer=layer))
    return specs


def decomposition_arrays(out: Decomposition) -> dict[str, torch.Tensor]:
    """A forward's token sum and attention rows by store name (empty when not requested)."""
    arrays = {}
    if out.token_sum is not None:
        arrays[schema.DIRECT_TOKEN_SUM.path()] = out.token_sum
    for layer, rows in out.attention.items():
        arrays[schema.ATTENTION.path(layer=layer)] = rows
    return arrays


def group_of(meta: dict | None, key: str) -> int | None:
    """The integer under `key` of a sample's json (None when absent or not an integer)."""
    if not meta or key not in meta:
        return None
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return None
    return int(value)


@dataclass(frozen=True)
class SampleExtras:
    """Per worker: how to read a sample's mask (None: not asked for) and group."""

    masks: MaskReader | None
    group_key: str

    @classmethod
    def of(cls, config: ExtractConfig, loaded: Any) -> SampleExtras:
        reader = None
        if config.masks:
            reader = MaskReader(config.masks, tuple(loaded.spec.image_size), config.mask_geometry, loaded.preprocess)
        return cls(reader, config.group_key)

    def rows(self, raw) -> dict[str, np.ndarray]:
        """The sample's rows that need no forward: its mask (`MASK_MISSING` when absent or unreadable)."""
        if self.masks is None:
            return {}
        try:
            return {schema.MASKS.path(): self.masks.read(raw.extra, raw.key)}
        except DataError as err:
            logger.warning("%s; its mask row holds %d (not labelled)", err, MASK_MISSING)
            return {schema.MASKS.path(): np.full(self.masks.image_size, MASK_MISSING, np.uint8)}

    def group(self, raw) -> int | None:
        return group_of(raw.meta, self.group_key)
