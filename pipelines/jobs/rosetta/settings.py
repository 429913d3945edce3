"""Every parameter of `clipscope rosetta`, declared as data and validated once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from clipscope.errors import ConfigError, ParameterError
from clipscope.kernels.rosetta_topk import RULES
from clipscope.params import Boolean, Each, Interval, Options, Text, Validated

SCORES = ("pearson", "reference")
MATMUL_DTYPES = ("float64", "float32")


@dataclass(frozen=True)
class RosettaSettings(Validated):
    """`others`: URLs of the other models' stores (the anchor is the store `run` writes into); `layers`:
    per model (anchor first) the layer names to use (an empty tuple: every map layer of the store);
    `k`: best-buddy K (Eq. 4.3); `self_k`: K of the anchor's self best buddies (clustering); `k_keep`:
    length of the streamed top lists (≥ k, self_k); `bb_rule`: symmetric (thesis) or reference (the
    official code: top-1 forward, top-K back); `score`: pearson (exact global coefficient) or reference
    (the official per-batch averaged cosine, batches of `reference_batch` images; comparison only);
    `tile`: units per tile side; `unit_block`: units per fixed-shape product inside a tile (bytes do
    not depend on the tile); `matmul_dtype`: float64, or float32 (GPU; moments stay float64);
    `keep_matrix`: also store the full float32 matrix per model; `examples`: dictionary images per
    concept; `chunks_per_block`: store chunks per row block of a task; `device`: cpu or cuda; `split_rows`:
    one task per (tile, row block), joined in a fixed tree (for few large tiles on many workers; the same
    bytes as one task per tile)."""

    others: tuple[str, ...]
    name: str = "default"
    layers: tuple[tuple[str, ...], ...] = ()
    k: int = 5
    self_k: int = 5
    k_keep: int = 16
    bb_rule: str = "symmetric"
    score: str = "pearson"
    reference_batch: int = 10
    tile: int = 2048
    unit_block: int = 128
    matmul_dtype: str = "float64"
    keep_matrix: bool = False
    examples: int = 8
    chunks_per_block: int = 4
    device: str = "cpu"
    split_rows: bool = False
    force: bool = False

    parameter_constraints: ClassVar = {
        "others": [Each(Text(), min_len=1)],
        "name": [Text()],
        "layers": [Each(Each(Text()))],
        **{name: [Interval(int, 1)] for name in ("k", "self_k", "k_keep", "reference_batch", "tile", "unit_block",
                                                 "examples", "chunks_per_block")},
        "bb_rule": [Options(*RULES, text=" or ".join(RULES))],
        "score": [Options(*SCORES, text=" or ".join(SCORES))],
        "matmul_dtype": [Options(*MATMUL_DTYPES, text=" or ".join(MATMUL_DTYPES))],
        "keep_matrix": [Boolean()],
        "device": [Options("cpu", "cuda", text="cpu or cuda")],
        "split_rows": [Boolean()],
        "force": [Boolean()],
    }

    def __post_init__(self) -> None:
        object.__setattr__(self, "others", tuple(self.others))
        object.__setattr__(self, "layers", tuple(tuple(names) for names in self.layers))
        super().__post_init__()
        if self.k_keep < max(self.k, self.self_k):
            object.__setattr__(self, "k_keep", max(self.k, self.self_k))
        if self.layers and len(self.layers) != 1 + len(self.others):
            raise ConfigError(f"layers must hold one entry per model (anchor first): {1 + len(self.others)}, "
                              f"got {len(self.layers)}")
        import re

        if not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$", self.name):
            raise ParameterError("name", f"must be letters, digits, '_', '.', '-', got {self.name!r}")

    def layers_of(self, model: int) -> tuple[str, ...]:
        return self.layers[model] if self.layers else ()

    def statistics_record(self) -> dict[str, Any]:
        """What the tiles' bytes depend on (a tile's done marker is reused only under the same record)."""
        return {"layers": [list(x) for x in self.layers], "k_keep": self.k_keep, "score": self.score,
                "reference_batch": self.reference_batch if self.score == "reference" else None, "tile": self.tile,
                "unit_block": self.unit_block, "matmul_dtype": self.matmul_dtype, "keep_matrix": self.keep_matrix,
                "chunks_per_block": self.chunks_per_block, "device": self.device}


Settings = RosettaSettings
