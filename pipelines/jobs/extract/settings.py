"""The extraction run's configuration: validated once at the entry point, frozen afterwards."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from clipscope.errors import ConfigError, ParameterError
from clipscope.params import Boolean, Each, Interval, NoneValue, Options, Text, validate_parameters
from clipscope.pipelines.jobs.extract.precision import COMPUTE_DTYPES

DTYPES = ("float16", "float32")
DEVICES = ("auto", "cpu", "cuda")

# Fields that change what lands in the store; a resumed run must agree on all of them.
RESULT_FIELDS = (
    "data", "model", "pretrained", "seed", "heads_layers", "second_order_layers", "token_layers",
    "activation_layers", "ln_convention", "dtype", "rows_per_chunk",
    "masks", "mask_geometry", "group_key", "token_sum", "attention_layers",
)
# Result fields added after stores were first written: a store without one was made with its default.
LATER_FIELD_DEFAULTS = {"masks": None, "mask_geometry": "preprocess", "group_key": "group", "token_sum": False,
                        "attention_layers": []}
MASK_GEOMETRIES = ("preprocess", "reference")


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
    compute_dtype: str = "auto"  # the forward's dtype (precision.py); auto: the storage dtype on CUDA, float32 on CPU
    batch_size: int | str = 32  # or "auto": from the device's free memory (batch_size.py)
    decode_threads: int | None = None  # None: 8 (at most the CPU count) next to a CUDA forward, else 1
    device: str = "auto"
    rows_per_chunk: int = 256
    workers: int | None = None  # N: an embedded Ray with N CPU actors (on a cluster: N actors); None: in-process
    address: str | None = None
    retry_failed: bool = False
    allow_local_store: bool = False
    masks: str | None = None  # a mask member (mask.png) stored as `masks` after the image's geometry
    mask_geometry: str = "preprocess"  # or "reference": squashed to the input size (the official code)
    group_key: str = "group"  # json key of the sample's group (samples.parquet `group`)
    token_sum: bool = False  # direct/token_sum: Σ over every layer and head per token
    attention_layers: tuple[int, ...] = ()  # attention/layer_{l}: the class-token attention row
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    parameter_constraints: ClassVar = {
        "batch_size": [Interval(int, 1), Options("auto", text="'auto'")],
        "compute_dtype": [Options(*COMPUTE_DTYPES, text=f"one of {', '.join(COMPUTE_DTYPES)}")],
        "decode_threads": [NoneValue(), Interval(int, 1)],
        "rows_per_chunk": [Interval(int, 1)],
        "workers": [NoneValue(), Interval(int, 1)],
        "ln_convention": [Options("split", "center", text="split or center")],
        "dtype": [Options(*DTYPES, text=f"one of {', '.join(DTYPES)}")],
        "device": [Options(*DEVICES, text=f"one of {', '.join(DEVICES)}")],
        "seed": [Interval(int)],
        "second_order_layers": [Each(Interval(int, 0))],
        "token_layers": [Each(Interval(int, 0))],
        "activation_layers": [Each(Interval(int, 0))],
        "heads_layers": [NoneValue(), Each(Interval(int, 0))],
        "retry_failed": [Boolean()],
        "allow_local_store": [Boolean()],
        "masks": [NoneValue(), Text()],
        "mask_geometry": [Options(*MASK_GEOMETRIES, text="preprocess or reference")],
        "group_key": [Text()],
        "token_sum": [Boolean()],
        "attention_layers": [Each(Interval(int, 0))],
    }

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("DATA must name at least one shard, pattern, directory or URL")
        if not self.out:
            raise ParameterError("out", "must name the store (a path or URL)")
        validate_parameters(self.parameter_constraints, {name: getattr(self, name) for name in self.parameter_constraints})
        for name in ("second_order_layers", "token_layers", "activation_layers", "heads_layers", "attention_layers"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(sorted(set(value))))
        object.__setattr__(self, "data", tuple(self.data))

    @property
    def uses_ray(self) -> bool:
        """Ray runs the shards when asked for workers or a cluster (also through $RAY_ADDRESS)."""
        return self.workers is not None or bool(self.address) or bool(os.environ.get("RAY_ADDRESS"))

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
        default = LATER_FIELD_DEFAULTS.get(key)
        if stored.get(key, default) != current.get(key, default):
            out.append(f"{key}: store has {stored.get(key)!r}, this run has {current.get(key)!r}")
    return out
