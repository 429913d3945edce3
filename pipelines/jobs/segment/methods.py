"""Segmentation methods by name: each turns a block of store rows into heat maps.

    @dataclass(frozen=True)
    class Method:
        name: str
        heat: Callable[[RunStore, slice, Context], np.ndarray]  # picklable; [rows gh gw] (grid) or [rows h w] (pixels)
        clip: bool                   # default of --clip (clip at 0 before the min–max)
        threshold: str | float       # default of --threshold: "mean" or a number (0.5 for neurons)
        resolution: str = "grid"     # "grid": bilinear upsampling to the input size follows; "pixels": as is
        check: Callable[[RunStore, Settings], None]  # raise early (a missing array, with the command that makes it)
        selection: Callable[[RunStore, Context], (array [class rank], attrs)]  # units a method chose, stored

`register_method(Method(...))` adds one (the neuron-segmentation method registers "neurons"); `get_method(name)`,
`list_methods()`. Built in:

* tokens — heat(p) = ⟨Σ_{l,h} c_{p,l,h}, w_ĉ − w̄⟩ over patch tokens (`direct/token_sum`, or `direct/tokens`
  of every layer), w̄ the mean class direction (equal to the reference's per-token mean over classes); clip at 0,
  threshold mean (the reference protocol);
* attention — the last layer's class-token attention row (`attention/layer_{L−1}`), mean over heads, patch
  tokens; no clip; threshold mean (the raw-attention baseline of the shapes evaluation);
* random — uniform noise per pixel, seeded by (seed, row): the protocol's chance level.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipscope.errors import ConfigError, StoreError
from clipscope.storage import schema
from clipscope.storage.store import RunStore


@dataclass(frozen=True)
class Context:
    """What a heat function gets besides the rows: the settings, each row's class (−1: not scored), the task's
    classifier [embed class] (float64), the patch grid (gh, gw) and the input size (h, w)."""

    settings: Any
    classes: np.ndarray
    weights: np.ndarray
    grid: tuple[int, int]
    size: tuple[int, int]


@dataclass(frozen=True)
class Method:
    name: str
    heat: Callable[[RunStore, slice, Context], np.ndarray]
    clip: bool
    threshold: str | float
    resolution: str = "grid"
    check: Callable[[RunStore, Any], None] | None = None
    selection: Callable[[RunStore, Context], tuple[np.ndarray, dict[str, Any]]] | None = None


_METHODS: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> None:
    if method.resolution not in ("grid", "pixels"):
        raise ConfigError(f"method {method.name!r}: resolution must be grid or pixels, got {method.resolution!r}")
    if method.name in _METHODS and not replace:
        raise ConfigError(f"segmentation method {method.name!r} is already registered (pass replace=True)")
    _METHODS[method.name] = method


def list_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ConfigError(f"unknown segmentation method {name!r}; known: {', '.join(list_methods())}")
    return _METHODS[name]


# --- tokens --------------------------------------------------------------------------------------


def _token_source(store: RunStore) -> str:
    names = store.array_names()
    if schema.DIRECT_TOKEN_SUM.path() in names:
        return schema.DIRECT_TOKEN_SUM.path()
    n_layers = int((store.attrs.get("model_spec") or {}).get("n_layers", -1))
    if schema.DIRECT_TOKENS.path() in names and list(store.info.token_layers) == list(range(n_layers)):
        return schema.DIRECT_TOKENS.path()
    raise StoreError(f"the tokens method needs direct/token_sum (or direct/tokens of every layer) in {store.url}; "
                     "extract with --token-sum")


def token_heat(store: RunStore, rows: slice, context: Context) -> np.ndarray:
    source = _token_source(store)
    terms = store.read(source, rows).astype(np.float64)
    if source == schema.DIRECT_TOKENS.path():
        terms = terms.sum((1, 2))
    directions = context.weights - context.weights.mean(1, keepdims=True)  # w_c − w̄
    chosen = directions[:, np.maximum(context.classes, 0)].T  # [rows embed]
    heat = np.einsum("rpd,rd->rp", terms[:, 1:], chosen)
    return heat.reshape(len(heat), *context.grid)


def _check_tokens(store: RunStore, settings: Any) -> None:
    _token_source(store)


# --- attention -----------------------------------------------------------------------------------


def _last_attention(store: RunStore) -> str:
    n_layers = int((store.attrs.get("model_spec") or {}).get("n_layers", 0))
    name = schema.ATTENTION.path(layer=n_layers - 1)
    if name not in store.array_names():
        raise StoreError(f"the attention method needs {name} in {store.url}; extract with --attention-layers "
                         f"{n_layers - 1}")
    return name


def attention_heat(store: RunStore, rows: slice, context: Context) -> np.ndarray:
    attention = store.read(_last_attention(store), rows).astype(np.float64)
    heat = attention.mean(1)[:, 1:]
    return heat.reshape(len(heat), *context.grid)


def _check_attention(store: RunStore, settings: Any) -> None:
    _last_attention(store)


# --- random --------------------------------------------------------------------------------------


def random_heat(store: RunStore, rows: slice, context: Context) -> np.ndarray:
    seed = int(context.settings.seed)
    return np.stack([np.random.default_rng([seed, row]).random(context.size) for row in range(rows.start, rows.stop)])


register_method(Method("tokens", token_heat, clip=True, threshold="mean", check=_check_tokens))
register_method(Method("attention", attention_heat, clip=False, threshold="mean", check=_check_attention))
register_method(Method("random", random_heat, clip=False, threshold="mean", resolution="pixels"))
