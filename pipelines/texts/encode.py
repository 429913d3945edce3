"""Unit text embeddings from a model's text tower, batched."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from clipscope.pipelines.models.loading import LoadedModel


def encode_texts(loaded: LoadedModel, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """Unit-norm text embeddings [text embed] from the model's text tower."""
    device = next(loaded.model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            tokens = loaded.tokenizer(list(texts[start:start + batch_size])).to(device)
            emb = loaded.model.encode_text(tokens).float()
            out.append(torch.nn.functional.normalize(emb, dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, loaded.spec.embed_dim), np.float32)
