"""The extraction run's configuration: validated once at the entry point, frozen afterwards."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from clipscope.errors import ConfigError

DTYPES = ("float16", "float32")
DEVICES = ("auto", "cpu", "cuda")

# Fields that change what lands in the store; a resumed run must agree on all of them.
RESULT_FIELDS = (
    "data", "model", "pretrained", "seed", "heads_layers", "second_order_layers", "token_layers",
    "activation_layers", "ln_convention", "dtype", "rows_per_chunk",
)


@dataclass(frozen=True)
class ExtractConfig:
    data: tuple[str, ...]
    out: str
    model: str = "clipscope-tiny"
    pretrained: str = "none"
    seed: int = 0
    heads_layers: tuple[int, ...] | None = None  # None: every layer
    second_order_layers: tuple[int, ...] = ()
    token_layers: tuple[int, ...] = ()
    activation_layers: tuple[int, ...] = ()
    ln_convention: str = "split"
    dtype: str = "float32"
    batch_size: int = 32
    device: str = "auto"
    rows_per_chunk: int = 256
    workers: int | None = None  # None: in-process without a cluster; one actor per GPU/CPU on Ray
    address: str | None = None
    retry_failed: bool = False
    allow_local_store: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("DATA must name at least one shard, pattern, directory or URL")
        if not self.out:
            raise ConfigError("--out must name the store (a path or URL)")
        for name in ("batch_size", "rows_per_chunk", "workers"):
            value = getattr(self, name)
            if name == "workers" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer ≥ 1, got {value!r}")
        if self.ln_convention not in ("split", "center"):
            raise ConfigError(f"--ln-convention must be split or center, got {self.ln_convention!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        for name in ("second_order_layers", "token_layers", "activation_layers", "heads_layers"):
            value = getattr(self, name)
            if value is None:
                continue
            if any(isinstance(v, bool) or not isinstance(v, int) for v in value):
                raise ConfigError(f"--{name.replace('_', '-')} must be integers, got {value!r}")
            object.__setattr__(self, name, tuple(sorted(set(value))))
        object.__setattr__(self, "data", tuple(self.data))

    @property
    def uses_ray(self) -> bool:
        """Ray runs the shards when asked for workers or a cluster (also through $RAY_ADDRESS)."""
        return (self.workers or 1) > 1 or bool(self.address) or bool(os.environ.get("RAY_ADDRESS"))

    def result_dict(self) -> dict[str, Any]:
        """The fields that determine the store's bytes (JSON-ready)."""
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if k in RESULT_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("storage_options")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def config_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between a store's recorded config and this run's."""
    out = []
    for key in RESULT_FIELDS:
        if stored.get(key) != current.get(key):
            out.append(f"{key}: store has {stored.get(key)!r}, this run has {current.get(key)!r}")
    return out
