"""Text embeddings of a pool, computed once with a store's model and cached in the store.

Key = hash of the pool's texts and the model identity; each pool is a group of its own
(`text_embeddings/<key>/embeddings`) because pools differ in length.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any, Sequence

import numpy as np

from clipscope.errors import ConfigError, StoreError
from clipscope.pipelines.models.loading import LoadedModel, load_run_model
from clipscope.pipelines.texts.encode import encode_texts
from clipscope.storage import schema
from clipscope.storage.store import RunStore

logger = logging.getLogger(__name__)
LOG_FROM_TEXTS = 1000  # smaller pools encode in about a second: no log line


def embeddings_key(texts: Sequence[str], model_identity: dict[str, Any]) -> str:
    """Hash of the texts and the model's weights' identity. A checkpoint is identified by its sha256,
    not by the path it was loaded from, so a moved or re-mounted checkpoint finds its cache."""
    identity = dict(model_identity)
    if identity.get("sha256"):
        identity.pop("pretrained", None)
    digest = hashlib.sha256()
    digest.update(json.dumps(list(texts)).encode())
    digest.update(json.dumps(identity, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def cached_text_embeddings(store: RunStore, texts: Sequence[str], *, pool_name: str = "custom",
                           loaded: LoadedModel | None = None) -> np.ndarray:
    """Unit text embeddings [text embed] of `texts` with the store's model, cached in the store."""
    if not texts:
        raise ConfigError("the text pool is empty")
    key = embeddings_key(texts, store.info.model.to_dict())
    name = schema.TEXT_EMBEDDINGS.path(key=key)  # a group per pool: pools differ in length
    if name in store.array_names():
        if store.mode == "r+" and schema.TEXT_OFFSETS.path(key=key) not in store.array_names():
            write_texts(store, key, texts, pool_name)  # cached by an older clipscope: add the texts
        return store.read_result(name)
    started = time.monotonic()
    if len(texts) > LOG_FROM_TEXTS:
        logger.info("encoding %d texts of %s with the run's model (once: cached in the store as %s)",
                    len(texts), pool_name, name.rsplit("/", 1)[0])
    embeddings = encode_texts(loaded or load_run_model(store), list(texts)).astype(np.float32)
    if len(texts) > LOG_FROM_TEXTS:
        logger.info("encoded %d texts in %.1f s", len(texts), time.monotonic() - started)
    if store.mode == "r+":
        store.write_result(name, embeddings, schema.TEXT_EMBEDDINGS.dims, {"pool": pool_name, "n_texts": len(texts)})
        write_texts(store, key, texts, pool_name)
    return embeddings


def write_texts(store: RunStore, key: str, texts: Sequence[str], pool_name: str) -> None:
    """The pool's texts beside their embeddings, so results decode without the pool's file:
    `text_embeddings/<key>/text_utf8[byte]` (the texts' UTF-8 bytes, concatenated) and
    `text_embeddings/<key>/text_offsets[text_edge]` (text i = bytes offsets[i]:offsets[i+1])."""
    encoded = [t.encode("utf-8") for t in texts]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in encoded])
    data = np.frombuffer(b"".join(encoded), np.uint8) if offsets[-1] else np.zeros(0, np.uint8)
    attrs = {"pool": pool_name, "n_texts": len(texts), "encoding": "utf-8"}
    store.write_result(schema.TEXT_UTF8.path(key=key), data, schema.TEXT_UTF8.dims, attrs)
    store.write_result(schema.TEXT_OFFSETS.path(key=key), offsets, schema.TEXT_OFFSETS.dims, attrs)


def stored_texts(store: RunStore, key: str) -> list[str]:
    """The texts of the pool cached under `key` (a results' `texts_key` attribute), read from the store."""
    names = store.array_names()
    if schema.TEXT_OFFSETS.path(key=key) not in names:
        if schema.TEXT_EMBEDDINGS.path(key=key) in names:
            raise StoreError(f"{store.url}: the text pool {key} was cached before texts were stored beside "
                             f"embeddings; rerun the command that used it to store them")
        raise StoreError(f"{store.url} has no text pool {key!r} under text_embeddings/")
    data = store.read_result(schema.TEXT_UTF8.path(key=key)).tobytes()
    offsets = store.read_result(schema.TEXT_OFFSETS.path(key=key))
    return [data[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])]


def cached_pools(store: RunStore) -> dict[str, dict[str, Any]]:
    """{key: {"pool": name, "n_texts": n, "texts_stored": bool}} of every cached text pool."""
    names = store.array_names()
    out = {}
    for name in names:
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "text_embeddings" and parts[2] == "embeddings":
            attrs = dict(store.array(name).attrs)
            out[parts[1]] = {"pool": attrs.get("pool"), "n_texts": attrs.get("n_texts"),
                             "texts_stored": schema.TEXT_OFFSETS.path(key=parts[1]) in names}
    return out
