"""The configuration of `clipscope maps`: extraction's (same planner, rows, actors, resume) plus the zoo model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from clipscope.errors import ParameterError
from clipscope.pipelines.jobs.extract.settings import ExtractConfig

MAPS_RESULT_FIELDS = ("data", "zoo", "checkpoint", "seed", "layers", "geometry", "dtype", "rows_per_chunk", "unit_chunk")


@dataclass(frozen=True)
class MapsConfig(ExtractConfig):
    """`zoo`: the zoo spec (pipelines.jobs.maps.zoo); `checkpoint`: a state dict (None: random init with
    `seed`); `layers`: hooked module names (empty: the network's defaults); `geometry`: the shared field
    of view S (shorter side → S, centre crop S × S), recorded and checked by `clipscope rosetta`; `unit_chunk`:
    units per inner zarr chunk (zarr sharding: one shard per row chunk)."""

    zoo: str = ""
    checkpoint: str | None = None
    layers: tuple[str, ...] = ()
    geometry: int = 224
    unit_chunk: int | None = None  # units per inner zarr chunk (None: one chunk of all units per row chunk)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.unit_chunk is not None and (isinstance(self.unit_chunk, bool) or not isinstance(self.unit_chunk, int)
                                            or self.unit_chunk < 1):
            raise ParameterError("unit_chunk", f"must be an integer ≥ 1, got {self.unit_chunk!r}")
        if not self.zoo:
            raise ParameterError("zoo", "must name a model (torchvision:NAME, open_clip:NAME, timm:NAME, "
                                        "python:pkg.module:factory or a registered name)")
        if isinstance(self.geometry, bool) or not isinstance(self.geometry, int) or self.geometry < 8:
            raise ParameterError("geometry", f"must be an integer ≥ 8, got {self.geometry!r}")
        object.__setattr__(self, "layers", tuple(self.layers))
        if len(set(self.layers)) != len(self.layers):
            raise ParameterError("layers", f"names a module twice: {list(self.layers)}")

    def result_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if k in MAPS_RESULT_FIELDS}
