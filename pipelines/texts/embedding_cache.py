"""Text embeddings of a pool, computed once with a store's model and cached in the store.

Key = hash of the pool's texts and the model identity; each pool is a group of its own
(`text_embeddings/<key>/embeddings`) because pools differ in length.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import numpy as np

from clipscope.errors import ConfigError
from clipscope.pipelines.models.loading import LoadedModel, load_run_model
from clipscope.pipelines.texts.encode import encode_texts
from clipscope.storage.store import RunStore


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
    key = embeddings_key(texts, store.attrs.get("model", {}))
    name = f"text_embeddings/{key}/embeddings"  # a group per pool: pools differ in length
    if name in store.array_names():
        return store.read_result(name)
    embeddings = encode_texts(loaded or load_run_model(store), list(texts)).astype(np.float32)
    if store.mode == "r+":
        store.write_result(name, embeddings, ("text", "embed"), {"pool": pool_name, "n_texts": len(texts)})
    return embeddings
