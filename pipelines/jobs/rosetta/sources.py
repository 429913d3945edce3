"""The models of a Rosetta run as map sources: a `clipscope maps` store, or a CLIP ViT store's activations.

A maps store holds ``maps/{layer}/values[sample, unit, y, x]``. An extracted CLIP ViT store serves its
``activations/layer_{l}[sample, token, neuron]`` directly as maps (layer name ``layer_{l}``): the prefix
tokens (class, registers) are dropped and the rest reshaped to the patch grid (gh, gw) from
``model_spec`` — no second extraction. Stores must be row-aligned (same shards through the same
planner): same sample keys row for row, same rows per chunk, same field of view (`geometry`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from clipscope.errors import ConfigError, StoreError, literal
from clipscope.storage import schema
from clipscope.storage.store import RunStore


@dataclass(frozen=True)
class LayerMaps:
    """One layer of a model: its store array and native map shape; `prefix` > 0 for a token array."""

    name: str
    array: str
    channels: int
    height: int
    width: int
    prefix: int = 0

    @property
    def size(self) -> tuple[int, int]:
        return (self.height, self.width)


@dataclass(frozen=True)
class Source:
    """A model of the run: its store, chosen layers (unit ids are layer-major in this order), identity."""

    url: str
    layers: tuple[LayerMaps, ...]
    geometry: int
    identity: dict[str, Any]

    @property
    def n_units(self) -> int:
        return sum(layer.channels for layer in self.layers)

    def offsets(self) -> list[int]:
        out, total = [], 0
        for layer in self.layers:
            out.append(total)
            total += layer.channels
        return out

    def unit_table(self) -> dict[str, np.ndarray]:
        """unit id → (layer_index, channel, height, width), int32."""
        cols: dict[str, list[int]] = {"layer_index": [], "channel": [], "height": [], "width": []}
        for i, layer in enumerate(self.layers):
            for c in range(layer.channels):
                for key, value in (("layer_index", i), ("channel", c), ("height", layer.height),
                                   ("width", layer.width)):
                    cols[key].append(value)
        return {k: np.asarray(v, np.int32) for k, v in cols.items()}

    def read(self, store: RunStore, layer: LayerMaps, rows: np.ndarray, channels: np.ndarray | None = None
             ) -> np.ndarray:
        """[len(rows), C, h, w] of one layer (float32 or float16 as stored); only `channels` when given
        (rows ascending). Only the chosen channels are materialised."""
        rows = np.asarray(rows, np.int64)
        if channels is None:
            channels = np.arange(layer.channels)
        array = store.array(layer.array)
        if layer.prefix or array.ndim == 3:
            values = np.asarray(array.oindex[rows, layer.prefix:, channels])
            return values.reshape(len(rows), layer.height, layer.width, len(channels)).transpose(0, 3, 1, 2)
        return np.asarray(array.oindex[rows, channels])


def _maps_layers(store: RunStore) -> tuple[dict[str, LayerMaps], int]:
    info = store.attrs.get("maps") or {}
    layers = {}
    for name in info.get("layers", []):
        c, h, w = info["shapes"][name]
        layers[name] = LayerMaps(name, schema.MAPS.path(layer=name), int(c), int(h), int(w))
    return layers, int((store.attrs.get("geometry") or {}).get("size", 0))


def _vit_layers(store: RunStore) -> tuple[dict[str, LayerMaps], int]:
    spec = store.attrs.get("model_spec") or {}
    image, patch = spec.get("image_size"), spec.get("patch_size")
    if not image or not patch:
        return {}, 0
    gh, gw = int(image[0]) // int(patch[0]), int(image[1]) // int(patch[1])
    prefix = int(spec["n_tokens"]) - gh * gw
    layers = {}
    for layer in schema.RunInfo.of(store).activation_layers:
        name = schema.ACTIVATIONS.path(layer=layer)
        if name in store.array_names():
            layers[f"layer_{layer}"] = LayerMaps(f"layer_{layer}", name, int(spec["mlp_width"]), gh, gw, prefix)
    if int(image[0]) != int(image[1]):
        raise ConfigError(f"{store.url}: a non-square input ({image}) has no square field of view")
    return layers, int(image[0])


def open_source(store: RunStore, wanted: tuple[str, ...], what: str) -> Source:
    """The map layers of `store` named in `wanted` (all when empty); ConfigError naming the layer."""
    layers, geometry = _maps_layers(store) if store.attrs.get("maps") else _vit_layers(store)
    if not layers:
        raise ConfigError(f"{what} {store.url} holds no activation maps: make it with `clipscope maps`, or "
                          "`clipscope extract --activation-layers …` for a CLIP ViT")
    chosen = wanted or tuple(layers)
    unknown = [name for name in chosen if name not in layers]
    if unknown:
        raise ConfigError(f"{{layers}}: {literal(what)} {literal(store.url)} has no map layer "
                          f"{literal(repr(unknown[0]))}; it has {literal(', '.join(layers))}", parameters=("layers",))
    return Source(store.url, tuple(layers[name] for name in chosen), geometry, dict(store.attrs.get("model") or {}))


def check_aligned(stores: list[RunStore], sources: list[Source]) -> None:
    """Refuse stores that are not row-aligned with the anchor (one line naming the first difference)."""
    anchor = stores[0]
    keys = _keyed_rows(anchor)
    for store, source in zip(stores[1:], sources[1:]):
        if store.n_rows != anchor.n_rows:
            raise ConfigError(f"{store.url} has {store.n_rows} rows, the anchor {anchor.url} {anchor.n_rows}: "
                              "make every store from the same shards")
        if store.rows_per_chunk != anchor.rows_per_chunk:
            raise ConfigError(f"{store.url} has {store.rows_per_chunk} rows per chunk, the anchor "
                              f"{anchor.rows_per_chunk}: make every store with the same --rows-per-chunk")
        if source.geometry != sources[0].geometry:
            raise ConfigError(f"{store.url} has the field of view (geometry) {source.geometry}, the anchor "
                              f"{sources[0].geometry}: make every store with the same --geometry")
        other = _keyed_rows(store)
        for (row, a), (row_b, b) in zip(keys, other):
            if (row, a) != (row_b, b):
                raise ConfigError(f"{store.url} row {row_b} holds sample {b!r}, the anchor's row {row} {a!r}: "
                                  "the stores are not row-aligned (make them from the same shards)")
        if len(keys) != len(other):
            raise ConfigError(f"{store.url} indexes {len(other)} samples, the anchor {len(keys)}")


def _keyed_rows(store: RunStore) -> list[tuple[int, str]]:
    table = store.read_samples()
    return sorted(zip(table.column("row").to_pylist(), table.column("key").to_pylist()))


def common_valid(stores: list[RunStore]) -> np.ndarray:
    valid = stores[0].read_valid()
    for store in stores[1:]:
        valid = valid & store.read_valid()
    if not valid.any():
        raise StoreError("no row is valid in every store of the run")
    return valid
