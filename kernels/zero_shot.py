"""Zero-shot classification, the one scoring every job and gate uses (open_clip's convention).

A class's weight is the mean of its prompts' unit text embeddings, normalised again; an image's
prediction is the class of highest cosine similarity. open_clip's logit scale multiplies every
logit alike and changes no prediction, so it is left out.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from clipscope.errors import ConfigError


def class_weights(prompt_embeddings: Float[Tensor, "cls template embed"]) -> Float[Tensor, "embed cls"]:
    """Unit class weights from the text embeddings of every (class, template) prompt."""
    if prompt_embeddings.ndim != 3 or 0 in prompt_embeddings.shape:
        raise ConfigError(f"prompt embeddings must be [class template embed] with no empty axis, "
                          f"got {tuple(prompt_embeddings.shape)}")
    unit = torch.nn.functional.normalize(prompt_embeddings, dim=-1)
    return torch.nn.functional.normalize(unit.mean(1), dim=-1).T


def zero_shot_logits(
    embedding: Float[Tensor, "*batch sample embed"], weights: Float[Tensor, "embed cls"]
) -> Float[Tensor, "*batch sample cls"]:
    """Cosine similarities with unit class weights (open_clip's logits up to its logit scale)."""
    return torch.nn.functional.normalize(embedding, dim=-1) @ weights


def predict(
    embedding: Float[Tensor, "*batch sample embed"], weights: Float[Tensor, "embed cls"]
) -> Int[Tensor, "*batch sample"]:
    """The predicted class of every sample (any norm; the arg-max of cosine similarity)."""
    return zero_shot_logits(embedding, weights.to(embedding.dtype)).argmax(-1)


def correct_counts(
    logits: Float[Tensor, "*batch sample cls"], classes: Int[Tensor, " sample"]
) -> Int[Tensor, "*batch"]:
    """Top-1 hits over the samples with a class (class ≥ 0)."""
    labelled = classes >= 0
    hits = (logits.argmax(-1) == classes) & labelled
    return hits.sum(-1)


def count_correct(
    embedding: Float[Tensor, "*batch sample embed"], weights: Float[Tensor, "embed cls"],
    classes: Int[Tensor, " sample"],
) -> Int[Tensor, "*batch"]:
    """Top-1 hits of the embeddings (any norm) under the class weights, over samples with class ≥ 0."""
    return correct_counts(zero_shot_logits(embedding, weights.to(embedding.dtype)), classes)
