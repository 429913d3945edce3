"""Measurements of a shapes-world CLIP through its own forward (open_clip zero-shot conventions:
prompt templates, mean of normalised embeddings): zero-shot accuracy per attribute, caption retrieval.
Used while training and by the evaluation gates."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clipscope.errors import ConfigError
from clipscope.kernels.zero_shot import class_weights, predict
from clipscope.pipelines.models.loading import LoadedModel
from clipscope.pipelines.texts.encode import encode_texts
from clipscope.pipelines.worlds.shapes import world


def image_tensor(images: np.ndarray, loaded: LoadedModel) -> torch.Tensor:
    """[batch h w 3] uint8 → the model's normalised input [batch 3 h w] float32.

    Equal to ``loaded.preprocess`` on the same images when they already have the model's size
    (resize and crop are then the identity), without the PIL round trip.
    """
    cfg = loaded.model.visual.preprocess_cfg
    expected = tuple(loaded.image_size)
    if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:3]) != expected or images.shape[3] != 3:
        raise ConfigError(f"images must be uint8 [batch {expected[0]} {expected[1]} 3], got {images.dtype} {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(cfg["mean"], dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(cfg["std"], dtype=torch.float32)[None, :, None, None]
    return (x - mean) / std


def zero_shot_weights(loaded: LoadedModel, classnames: Sequence[str], prompts: Sequence[Callable[[str], str]]) -> torch.Tensor:
    """[embed class] classifier of normalised, template-averaged text embeddings."""
    texts = encode_texts(loaded, [fill(name) for name in classnames for fill in prompts])
    return class_weights(torch.from_numpy(texts).reshape(len(classnames), len(prompts), -1))


def encode_images(loaded: LoadedModel, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """[batch embed] normalised image embeddings of uint8 images."""
    device = next(loaded.model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = image_tensor(images[start:start + batch_size], loaded).to(device)
            out.append(F.normalize(loaded.model.encode_image(x), dim=-1).cpu())
    return torch.cat(out)


ATTRIBUTE_TASKS = {
    "colour": (list(world.COLOURS), world.COLOUR_PROMPTS, lambda o: list(world.COLOURS).index(o.colour)),
    "shape": (list(world.SHAPES), world.SHAPE_PROMPTS, lambda o: world.SHAPES.index(o.shape)),
    "label": (list(world.LABELS), world.LABEL_PROMPTS, lambda o: world.LABELS.index(o.name)),
}


def zero_shot_accuracy(loaded: LoadedModel, scenes: Sequence[world.Scene], embeddings: torch.Tensor | None = None) -> dict:
    """Main-object accuracy per attribute task, and (several objects) whether the pick is in the image."""
    if embeddings is None:
        embeddings = encode_images(loaded, np.stack([s.image for s in scenes]))
    out = {}
    for task, (names, prompts, index_of) in ATTRIBUTE_TASKS.items():
        predicted = predict(embeddings, zero_shot_weights(loaded, names, prompts))
        main = torch.tensor([index_of(s.main) for s in scenes])
        present = [{index_of(o) for o in s.objects} for s in scenes]
        out[f"{task}_acc"] = (predicted == main).float().mean().item()
        out[f"{task}_any_acc"] = float(np.mean([int(p) in pr for p, pr in zip(predicted.tolist(), present)]))
    counts = sorted(world.COUNT_WORDS)
    predicted = predict(embeddings, zero_shot_weights(loaded, [world.COUNT_WORDS[c] for c in counts], world.COUNT_PROMPTS))
    truth = torch.tensor([counts.index(len(s.objects)) for s in scenes])
    out["count_acc"] = (predicted == truth).float().mean().item()
    return out


def retrieval(loaded: LoadedModel, scenes: Sequence[world.Scene], embeddings: torch.Tensor | None = None,
              ks: Sequence[int] = (1, 5)) -> dict:
    """Caption retrieval in both directions among the scenes' own captions; a hit is a retrieved
    caption that is true of the image (or an image the caption is true of), with its chance level."""
    if embeddings is None:
        embeddings = encode_images(loaded, np.stack([s.image for s in scenes]))
    texts = torch.from_numpy(encode_texts(loaded, [s.caption for s in scenes]))
    truth = torch.from_numpy(world.claim_matrix(scenes))  # [caption image]
    sims = embeddings @ texts.T  # [image text]
    out: dict = {"n": len(scenes)}
    n = len(scenes)
    for k in ks:
        for direction, scores, hits in (("image_to_text", sims, truth.T), ("text_to_image", sims.T, truth)):
            top = scores.topk(k, dim=1).indices
            out[f"{direction}_r{k}"] = hits.gather(1, top).any(1).float().mean().item()
            # Chance of a hit when k items are drawn at random without replacement.
            m, miss = hits.sum(1).double(), torch.ones(n, dtype=torch.float64)
            for j in range(k):
                miss = miss * (n - m - j).clamp(min=0) / (n - j)
            out[f"{direction}_chance_r{k}"] = (1 - miss).mean().item()
    return out
