"""Streaming means over the sample axis: per-block sums in float64, merged exactly in any order.

Used for the dataset means that centre second-order effects (q̄_n per neuron, the mean shared
term) before the top-k pass; the mean of a store column is the merge of its row blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from clipscope.errors import ConfigError, DataError


@dataclass(frozen=True)
class SumStats:
    """count rows and their float64 sum (any trailing shape)."""

    count: int
    total: Float[Tensor, "..."]

    @property
    def mean(self) -> Float[Tensor, "..."]:
        if self.count < 1:
            raise DataError("cannot take the mean of zero rows")
        return self.total / self.count


def sum_stats(rows: Float[Tensor, "sample ..."]) -> SumStats:
    """Statistics of one block of rows (the first axis is the sample axis)."""
    if rows.ndim < 1:
        raise ConfigError(f"rows must have a leading sample axis, got a {rows.ndim}-d tensor")
    return SumStats(int(rows.shape[0]), rows.to(torch.float64).sum(dim=0))


def merge_sum_stats(a: SumStats, b: SumStats) -> SumStats:
    """Statistics of the union of two disjoint row sets."""
    if a.total.shape != b.total.shape:
        raise ConfigError(f"cannot merge sums of shapes {tuple(a.total.shape)} and {tuple(b.total.shape)}")
    return SumStats(a.count + b.count, a.total + b.total)
