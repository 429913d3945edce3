"""What the shapes-world CLIP has learnt, measured on held-out scenes with known truth.

- zero-shot accuracy (colour, shape, colour+shape, count) and caption retrieval: `shapes_train`;
- zero-shot segmentation: per-token direct effects (docs/methods.md, thesis §2.5) along the text of
  the image's own class, "a {colour} {shape}", binarised and compared with the main object's mask;
  the baselines are the raw class-token attention of the last layer (mean over heads) and a
  uniform-noise map, scored the same way;
- mean-ablation: which direct-effect terms carry the zero-shot accuracy when every other term is
  replaced by its mean over the evaluated scenes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from clipscope.errors import ConfigError
from clipscope.kernels.decompose import DecomposeRequest, Decomposition, decompose
from clipscope.kernels.vit import ViTSpec
from clipscope.pipelines.worlds.shapes import world
from clipscope.pipelines.models.loading import LoadedModel
from clipscope.pipelines.worlds.shapes.probes import image_tensor, retrieval, zero_shot_accuracy, zero_shot_weights


def to_pixels(patch_scores: Float[Tensor, "batch patch"], spec: ViTSpec) -> Float[Tensor, "batch h w"]:
    """Bilinear upsampling of the patch grid to the input resolution."""
    gh, gw = spec.image_size[0] // spec.patch_size[0], spec.image_size[1] // spec.patch_size[1]
    grid = patch_scores.reshape(-1, 1, gh, gw).float()
    return F.interpolate(grid, size=tuple(spec.image_size), mode="bilinear", align_corners=False)[:, 0]


def segmentation_scores(heatmaps: Float[Tensor, "batch h w"], masks: Bool[np.ndarray, "batch h w"]) -> dict:
    """Pixel accuracy and mIoU (foreground/background) of per-image min-max normalised heatmaps
    thresholded at their mean, accumulated over the dataset (the protocol of Chefer et al. that the
    thesis uses for ImageNet-segmentation)."""
    flat = heatmaps.reshape(len(heatmaps), -1).double()
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    norm = (flat - low) / (high - low).clamp_min(1e-12)
    pred = norm > norm.mean(1, keepdim=True)
    truth = torch.as_tensor(np.asarray(masks)).reshape(len(masks), -1).bool()
    ious = []
    for cls in (False, True):
        inter = ((pred == cls) & (truth == cls)).sum().item()
        union = ((pred == cls) | (truth == cls)).sum().item()
        ious.append(inter / union if union else 1.0)
    return {"pixel_acc": (pred == truth).double().mean().item(), "miou": float(np.mean(ious))}


def cls_attention(loaded: LoadedModel, images: Float[Tensor, "batch 3 h w"], layer: int
                  ) -> tuple[Float[Tensor, "batch head token"], Float[Tensor, "batch embed"]]:
    """Class-token attention of resblock `layer`, per head, from the model's own attention module
    (its ln_1 output captured during ``encode_image``), and the ``encode_image`` output."""
    block = loaded.model.visual.transformer.resblocks[layer]
    captured: dict[str, Tensor] = {}
    handle = block.ln_1.register_forward_hook(lambda module, inputs, output: captured.setdefault("y", output))
    try:
        with torch.no_grad():
            output = loaded.model.encode_image(images)
            y = captured["y"]
            _, weights = block.attn(y, y, y, need_weights=True, average_attn_weights=False)
    finally:
        handle.remove()
    return weights[:, :, 0], output


def label_directions(loaded: LoadedModel) -> Float[Tensor, "embed label"]:
    return zero_shot_weights(loaded, list(world.LABELS), world.LABEL_PROMPTS).cpu()


def decompose_scenes(loaded: LoadedModel, scenes: Sequence[world.Scene], token_layers: Sequence[int]) -> tuple[Tensor, Decomposition]:
    images = image_tensor(np.stack([s.image for s in scenes]), loaded)
    return images, decompose(loaded.spec, images, DecomposeRequest(direct=True, token_layers=tuple(token_layers)))


def class_text_directions(loaded: LoadedModel, labels: Sequence[int]) -> Float[Tensor, "batch embed"]:
    """Each scene's class text direction with the mean over all classes removed.

    Zero-shot scores compare classes, so only w_c − mean_c' w_c' matters to them; the common part
    (what "a photo of a … shape" shares) would light up every token that adds to the image norm."""
    weights = label_directions(loaded)  # [embed label]
    return (weights - weights.mean(1, keepdim=True))[:, list(labels)].T


def segmentation(loaded: LoadedModel, scenes: Sequence[world.Scene], *,
                 terms: tuple[Tensor, Decomposition] | None = None) -> dict:
    """Zero-shot segmentation of each scene's main object: ours (the per-token direct effects
    c_token^t = Σ_{l,h} c_{t,l,h} of docs/methods.md, every layer, along the scene's class text) vs the
    last layer's raw class-token attention (mean over heads), and a uniform-noise map (chance level of
    the protocol); `terms` must hold every layer's tokens."""
    spec = loaded.spec
    layers = list(range(spec.n_layers))
    images, out = terms if terms is not None else decompose_scenes(loaded, scenes, layers)
    if out.tokens.shape[1] != spec.n_layers:
        raise ConfigError(f"segmentation needs the per-token terms of all {spec.n_layers} layers, "
                          f"got {out.tokens.shape[1]}")
    texts = class_text_directions(loaded, [s.label for s in scenes])  # [batch embed]
    tokens = out.tokens.sum((1, 2))[:, 1:]  # [batch patch embed]
    ours = to_pixels(torch.einsum("bpd,bd->bp", tokens.float(), texts), spec)
    attention, _ = cls_attention(loaded, images, spec.n_layers - 1)
    baseline = to_pixels(attention.mean(1)[:, 1:], spec)
    masks = np.stack([s.object_mask(0) for s in scenes])
    noise = torch.from_numpy(np.random.default_rng(0).random(masks.shape))  # what the protocol gives a blind map
    return {"ours": segmentation_scores(ours, masks), "attention": segmentation_scores(baseline, masks),
            "random": segmentation_scores(noise, masks), "n": len(scenes)}


def mean_ablation(loaded: LoadedModel, scenes: Sequence[world.Scene], *, last_layers: int = 2,
                  out: Decomposition | None = None) -> dict:
    """Zero-shot accuracy when some direct-effect terms are replaced by their mean over the evaluated
    scenes: the MLPs and every head but those of the last `last_layers` layers (the thesis's
    ablation, `clipscope evaluate --keep-last`; the class embedding's and the biases' terms stay);
    everything but the heads; everything but the MLPs; and only the last layers' heads."""

    if out is None:
        _, out = decompose_scenes(loaded, scenes, ())
    first = loaded.spec.n_layers - last_layers
    emb, heads, mlps = out.image_embedding, out.direct.heads, out.direct.mlps
    ablated_sets = {  # name → the sum of the ablated terms
        "keep_last_heads": mlps.sum(1) + heads[:, :first].sum((1, 2)),
        "heads_only": emb - heads.sum((1, 2)),
        "mlps_only": emb - mlps.sum(1),
        "without_last_heads": heads[:, first:].sum((1, 2)),
    }
    result: dict = {"full": zero_shot_accuracy(loaded, scenes, F.normalize(emb, dim=-1))}
    for name, ablated in ablated_sets.items():
        result[name] = zero_shot_accuracy(loaded, scenes, F.normalize(emb - ablated + ablated.mean(0, keepdim=True), dim=-1))
    result["last_layers"] = list(range(first, loaded.spec.n_layers))
    return result


def evaluate(loaded: LoadedModel, *, seed: int = 2, n: int = 1000) -> dict:
    """Held-out numbers: zero-shot on single-object and mixed scenes, caption retrieval, and what the
    decomposition shows (segmentation by per-token direct effects, mean-ablation of the MLPs and all
    heads but the last two layers') on `min(n, 300)` single-object scenes."""
    size = loaded.image_size[0]
    single = list(world.generate_scenes(n, seed, config=world.WorldConfig(image_size=size, counts=(1,))))
    mixed = list(world.generate_scenes(n, seed + 1, config=world.WorldConfig(image_size=size)))
    probe = single[:300]
    last = loaded.spec.n_layers
    terms = decompose_scenes(loaded, probe, tuple(range(last)))
    return {"single": zero_shot_accuracy(loaded, single), "mixed": zero_shot_accuracy(loaded, mixed),
            "retrieval_mixed": retrieval(loaded, mixed[:500]),
            "segmentation": segmentation(loaded, probe, terms=terms),
            "mean_ablation": mean_ablation(loaded, probe, last_layers=2, out=terms[1])}
