"""Unit text embeddings from a model's text tower, batched."""

from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np
import torch

from clipscope.pipelines.models.loading import LoadedModel

logger = logging.getLogger(__name__)


def encode_texts(loaded: LoadedModel, texts: Sequence[str], batch_size: int = 256,
                 log_every_s: float = 5.0) -> np.ndarray:
    """Unit-norm text embeddings [text embed] from the model's text tower, in batches; a log line
    (texts done, texts/s, ETA) every `log_every_s` seconds while it runs."""
    device = next(loaded.model.parameters()).device
    out = []
    started = last = time.monotonic()
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            tokens = loaded.tokenizer(list(texts[start:start + batch_size])).to(device)
            emb = loaded.model.encode_text(tokens).float()
            out.append(torch.nn.functional.normalize(emb, dim=-1).cpu().numpy())
            now = time.monotonic()
            if now - last >= log_every_s:
                last = now
                done = min(start + batch_size, len(texts))
                rate = done / max(now - started, 1e-9)
                logger.info("encoding texts: %d/%d (%.0f%%), %.0f texts/s, ETA %.0fs", done, len(texts),
                            100 * done / len(texts), rate, (len(texts) - done) / rate)
    return np.concatenate(out) if out else np.zeros((0, loaded.spec.embed_dim), np.float32)
