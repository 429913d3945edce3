"""The textspan job's result: every head's picks, per layer, and the pool they index."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from clipscope.errors import ParameterError, StoreError
from clipscope.pipelines.jobs.textspan.settings import TextSpanSettings
from clipscope.pipelines.texts.embedding_cache import embeddings_key
from clipscope.pipelines.texts.pools import get_pool
from clipscope.storage import schema
from clipscope.storage.results import Reduction
from clipscope.storage.store import RunStore

ARRAYS = ("indices", "variances", "explained_ratio")


def layer_group(layer: int) -> str:
    return schema.TEXTSPAN.path(layer=layer)


def resolve(store: RunStore, settings: TextSpanSettings) -> tuple[tuple[int, ...], tuple[str, ...], str, str]:
    """The layers, the texts, the pool's name and the texts' cache key that `settings` mean for `store`."""
    layers = tuple(store.info.heads_layers)[-4:] if settings.layers is None else tuple(settings.layers)
    if settings.texts is not None:
        texts, pool = tuple(settings.texts), settings.pool or "custom"
    elif settings.pool is not None:
        found = get_pool(settings.pool)
        texts, pool = tuple(found.texts), found.name
    else:
        raise ParameterError("texts", "or pool must be given (the texts to describe the heads with), got neither")
    return layers, texts, pool, embeddings_key(texts, store.info.model.to_dict())


def read_layer(store: RunStore, layer: int, texts_key: str) -> dict[str, np.ndarray]:
    """One layer's stored picks (and the span rank each head used), checked to be of the pool `texts_key`."""
    group = layer_group(layer)
    existing = set(store.array_names())
    if any(f"{group}/{key}" not in existing for key in ARRAYS):
        raise StoreError(f"{store.url} has no TextSpan results for layer {layer}; they are made by "
                         f"`clipscope textspan {store.url} --layers {layer}`")
    attrs = store.array(f"{group}/indices").attrs
    if attrs.get("texts_key") != texts_key:
        raise StoreError(f"{group} of {store.url} was searched with another text pool (stored: "
                         f"{attrs.get('pool')!r}); rerun `clipscope textspan {store.url} --layers {layer}` on "
                         "this pool")
    out = {key: store.read_result(f"{group}/{key}") for key in ARRAYS}
    out["span_ranks_used"] = np.asarray(attrs.get("span_ranks_used", []), np.int64)
    return out


@dataclass(frozen=True)
class Result:
    settings: TextSpanSettings
    layers: tuple[int, ...]
    texts: tuple[str, ...]  # the pool searched
    pool: str
    texts_key: str  # the pool's key in the store's text-embedding cache
    indices: dict[int, np.ndarray]  # layer → [head pick] text index of each pick
    variances: dict[int, np.ndarray]  # layer → [head pick] variance each pick explains
    explained_ratio: dict[int, np.ndarray]  # layer → [head pick] its share of the head's variance
    span_ranks_used: dict[int, np.ndarray]  # layer → [head] the span rank each head's search used

    def write(self, run: Reduction) -> None:
        """Each layer's group written whole (storage.results), with this run's record."""
        for layer in self.layers:
            attrs = {"pool": self.pool, "n_texts": len(self.texts), "basis_size": self.settings.basis_size,
                     "span_rank": self.settings.span_rank,
                     "span_ranks_used": [int(r) for r in self.span_ranks_used[layer]],
                     "normalize": self.settings.normalize, "texts_key": self.texts_key}
            arrays = {key: getattr(self, key)[layer] for key in ARRAYS}
            run.write_group(layer_group(layer), {k: (v, schema.TEXTSPAN.dims(k), attrs) for k, v in arrays.items()},
                            attrs)

    @classmethod
    def read(cls, store: RunStore, settings: TextSpanSettings) -> Result:
        layers, texts, pool, texts_key = resolve(store, settings)
        per_layer = {layer: read_layer(store, layer, texts_key) for layer in layers}
        return cls.of_layers(settings, layers, texts, pool, texts_key, per_layer)

    @classmethod
    def of_layers(cls, settings: TextSpanSettings, layers: tuple[int, ...], texts: tuple[str, ...], pool: str,
                  texts_key: str, per_layer: dict[int, dict[str, np.ndarray]]) -> Result:
        return cls(settings, layers, texts, pool, texts_key,
                   *({layer: per_layer[layer][key] for layer in layers} for key in (*ARRAYS, "span_ranks_used")))

    def table(self) -> pa.Table:
        """One row per pick: layer, head, rank, text, variance, explained_ratio."""
        rows: dict[str, list] = {k: [] for k in ("layer", "head", "rank", "text", "variance", "explained_ratio")}
        for layer in self.layers:
            indices, variances, ratios = self.indices[layer], self.variances[layer], self.explained_ratio[layer]
            for head in range(indices.shape[0]):
                for rank, (j, var, ratio) in enumerate(zip(indices[head], variances[head], ratios[head])):
                    rows["layer"].append(layer)
                    rows["head"].append(head)
                    rows["rank"].append(rank)
                    rows["text"].append(self.texts[int(j)])
                    rows["variance"].append(float(var))
                    rows["explained_ratio"].append(float(ratio))
        return pa.table(rows)
