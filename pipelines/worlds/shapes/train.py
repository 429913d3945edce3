"""Train the shapes-world CLIP, ship it and load it (its measurements: `probes` and `evaluate`).

``python -m clipscope.pipelines.worlds.shapes.train`` trains `clipscope-shapes` (both towers, from the
seeded random init of `load_model`) contrastively on freshly generated shapes-world batches and
writes the fp16 state dict to ``pipelines/worlds/shapes/assets/clipscope-shapes.safetensors``. Everything is a
function of the `TrainConfig` (model seed, world seed, steps, …): torch runs with deterministic
algorithms and a fixed thread count, so rerunning the script on the same machine reproduces the
tensors and metadata bit for bit (``--check`` retrains and compares `content_digest`s; the file's
own bytes vary with safetensors' metadata key order). Other CPUs may round differently (other SIMD
paths), so the shipped file, not the script, is the reference.

Loss: InfoNCE in both directions (as open_clip's ``ClipLoss``) except that every caption that is
*true* of an image is a positive of it, the target spread evenly over them (the world knows:
`shapes_world.claim_matrix`). Short templated captions are often true of several images of a
batch ("two shapes", "a star", "a red shape"); counted as negatives they would push "a star"
away from most star images and stall shape learning.

Planted readout. The thesis finds that a large CLIP's last attention layers write most of what
zero-shot classification reads (mean-ablating everything else keeps the accuracy). A 4-layer model
trained for minutes does not get there by itself: the shipped model of the previous version read
shape largely from the class token's MLPs (last two layers' heads alone: colour 0.58, shape 0.39).
The world plants that structure instead, so the methods can be checked against it: a second
InfoNCE term, weighted `readout_weight`, scores the embedding in which the direct effects of the
MLPs and of every head but those of the last `readout_layers` layers are mean-ablated over the batch
(`keep_last_embedding`: `clipscope evaluate --keep-last`'s ablation, differentiable). Whether the planted
structure is there is measured afterwards only through clipscope's decomposition and store.

Planted heads (`planted_heads`, `planted_weight`; off for the shipped checkpoint). A further term trains
named heads to carry one property each: a head's own direct effect alone is scored against the texts of
its property's values ("a red shape", "a star"). With `init_checkpoint` it fine-tunes a trained model. It
is an experiment towards heads that CLIP-InterpreT's per-head analyses can single out in a model this
small (see the README's shapes-world section for what it gave).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from clipscope.errors import ConfigError, ModelError
from clipscope.kernels.decompose import layer_norm_stats
from clipscope.pipelines.worlds.shapes import world
from clipscope.pipelines.models.loading import LoadedModel, load_model, sha256_file
from clipscope.pipelines.worlds.shapes.evaluate import evaluate, mean_ablation
from clipscope.pipelines.worlds.shapes.probes import image_tensor, zero_shot_accuracy

SHAPES_MODEL = "clipscope-shapes"
ASSET_DIR = pathlib.Path(__file__).parent / "assets"
CHECKPOINT = ASSET_DIR / f"{SHAPES_MODEL}.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    """Everything the shipped checkpoint is a function of (with the code and the torch build)."""

    model: str = SHAPES_MODEL
    seed: int = 0  # model init
    data_seed: int = 1  # shapes world of the training images (held-out evaluation uses others)
    steps: int = 1000
    batch_size: int = 224
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    pos_init_std: float = 1.0  # image positional embedding re-initialised N(0, this²); see train()
    text_lr_scale: float = 1.0  # the text tower's learning rate relative to lr for the first text_slow_steps
    text_slow_steps: int = 0
    captions_per_image: int = 1  # each image's caption plus this many − 1 from other templates
    readout_weight: float = 0.3  # weight of the head-readout loss (see `keep_last_embedding`)
    readout_layers: int = 2  # … whose kept heads are those of the last this many layers
    # Fields below were added after the shipped checkpoint; `record()` leaves them out at their defaults.
    readout_shares: str = "split-v1"  # the shares of `keep_last_embedding`
    planted_heads: str = ""  # "L3H3=colour,L2H2=shape": heads trained to carry one property alone (`planted_loss`)
    planted_weight: float = 0.0  # weight of each planted head's loss
    init_checkpoint: str = ""  # start from these weights (a fine-tune) instead of the seeded init
    grad_clip_norm: float = 1.0  # clip the global gradient norm to this (0: off), as open_clip's --grad-clip-norm
    position_jitter: float = 0.0  # shapes-world geometry of the training images
    radius_jitter: float = 0.05
    threads: int = 2

    def validated(self) -> "TrainConfig":
        for name in ("steps", "batch_size", "threads", "captions_per_image"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer ≥ 1, got {value!r}")
        for name in ("seed", "data_seed", "warmup_steps", "text_slow_steps", "readout_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer ≥ 0, got {value!r}")
        for name in ("lr", "min_lr", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
                raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")
        if isinstance(self.pos_init_std, bool) or not isinstance(self.pos_init_std, (int, float)) or not 0 <= self.pos_init_std <= 10:
            raise ConfigError(f"pos_init_std must be a number in [0, 10] (0 keeps open_clip's init), got {self.pos_init_std!r}")
        if isinstance(self.grad_clip_norm, bool) or not isinstance(self.grad_clip_norm, (int, float)) or self.grad_clip_norm < 0:
            raise ConfigError(f"grad_clip_norm must be a number ≥ 0 (0: off), got {self.grad_clip_norm!r}")
        if isinstance(self.readout_weight, bool) or not isinstance(self.readout_weight, (int, float)) or not 0 <= self.readout_weight <= 10:
            raise ConfigError(f"readout_weight must be a number in [0, 10], got {self.readout_weight!r}")
        planted_roles(self.planted_heads)
        if isinstance(self.planted_weight, bool) or not isinstance(self.planted_weight, (int, float)) or not 0 <= self.planted_weight <= 10:
            raise ConfigError(f"planted_weight must be a number in [0, 10], got {self.planted_weight!r}")
        if self.readout_shares not in ("split", "split-v1"):
            raise ConfigError(f"readout_shares must be 'split' or 'split-v1', got {self.readout_shares!r}")
        self.world(48)
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr must be ≤ lr ({self.lr}), got {self.min_lr!r}")
        return self

    def record(self) -> dict:
        """The config as the checkpoint's metadata records it: every field, except those added after the
        shipped checkpoint while they hold their defaults (so its record, and `--check`, stay valid)."""
        defaults = TrainConfig()
        return {name: value for name, value in asdict(self).items()
                if name not in LATER_FIELDS or value != getattr(defaults, name)}

    def world(self, image_size: int) -> world.WorldConfig:
        return world.WorldConfig(image_size=image_size, position_jitter=self.position_jitter,
                                 radius_jitter=self.radius_jitter).validated()


LATER_FIELDS = ("readout_shares", "planted_heads", "planted_weight", "init_checkpoint")


# ----------------------------------------------------------------------------------------------
# Data


def training_batch(step: int, config: TrainConfig,
                   loaded: LoadedModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[world.Scene]]:
    """Images [batch], tokens [batch · captions_per_image] (each image's own caption first, then
    its extra captions), the [caption image] truth matrix and the scenes of training step `step`."""
    start = step * config.batch_size
    scenes = list(world.generate_scenes(config.batch_size, config.data_seed, start=start,
                                        config=config.world(loaded.image_size[0])))
    captions, claims = [s.caption for s in scenes], [s.claim for s in scenes]
    for offset, scene in enumerate(scenes):
        for caption, claim in world.extra_captions(scene, config.data_seed, start + offset, config.captions_per_image - 1):
            captions.append(caption)
            claims.append(claim)
    images = image_tensor(np.stack([s.image for s in scenes]), loaded)
    return images, loaded.tokenizer(captions), torch.from_numpy(world.claim_matrix(scenes, claims)), scenes


def multi_positive_infonce(image_features, text_features, logit_scale, truth) -> torch.Tensor:
    """Symmetric InfoNCE whose targets are spread evenly over every caption true of an image (and
    every image a caption is true of); `truth` is [caption image] with a true diagonal."""
    logits = logit_scale * image_features @ text_features.T  # [image text]
    per_image = truth.T.float() / truth.T.sum(1, keepdim=True)
    per_text = truth.float() / truth.sum(1, keepdim=True)
    return (torch.sum(-per_image * F.log_softmax(logits, 1), 1).mean()
            + torch.sum(-per_text * F.log_softmax(logits.T, 1), 1).mean()) / 2


class ClassTokenTap:
    """Captures, during ``encode_image``, what the readout loss needs of the class token: each
    resblock's attention and MLP writes to the residual (after LayerScale; the attention write is
    the sum over heads plus the out-projection bias) and the final residual that enters ln_post.
    A context manager; hooks are removed on exit."""

    def __init__(self, visual: torch.nn.Module):
        self.visual, self.attn, self.mlp, self.final, self._handles = visual, {}, {}, None, []

    def __enter__(self) -> "ClassTokenTap":
        for layer, block in enumerate(self.visual.transformer.resblocks):
            self._handles.append(block.ls_1.register_forward_hook(self._keep(self.attn, layer)))
            self._handles.append(block.ls_2.register_forward_hook(self._keep(self.mlp, layer)))
        self._handles.append(self.visual.ln_post.register_forward_pre_hook(self._keep_final))
        return self

    @staticmethod
    def _keep(into: dict, layer: int):
        def hook(module, inputs, output):
            into[layer] = output[:, 0]  # batch_first [batch token width]
        return hook

    def _keep_final(self, module, inputs):
        x = inputs[0]
        self.final = x[:, 0] if x.ndim == 3 else x

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def keep_last_embedding(visual: torch.nn.Module, tap: ClassTokenTap, embedding: Float[Tensor, "batch embed"],
                        keep: Sequence[int], shares: str = "split") -> Float[Tensor, "batch embed"]:
    """The image embedding with the direct effects of every MLP and of the heads of all layers but
    `keep` mean-ablated over the batch — `clipscope evaluate`'s ``keep_last_k`` and
    `shapes_eval.mean_ablation`'s "keep_last_heads" (the thesis's ablation: the class embedding's
    and the biases' terms stay), in the `split` convention of docs/methods.md, differentiable.

    ln_post (μ, σ of the sample's own final residual) folds into P̃ = diag(γ)P. `shares="split"`
    (docs/methods.md, the reference code's): a layer's heads sum to its whole attention write (the
    out-projection bias lives inside the heads) and carry 1/K₁ of the offset Pᵀβ − (μ/σ)Pᵀγ, as does
    each MLP (K₁ = 2L + 1). `shares="split-v1"`: the old `split` shares (heads without the
    out-projection bias, each of K = 1 + 2L + LH components carrying 1/K), the objective the shipped
    checkpoint was trained with, kept so that `train --check` reproduces it. The mean is a constant
    (detached), as the dataset mean is at evaluation.
    """
    if shares not in ("split", "split-v1"):
        raise ConfigError(f"shares must be 'split' or 'split-v1', got {shares!r}")
    ln, proj = visual.ln_post, visual.proj
    blocks = visual.transformer.resblocks
    n_layers, n_heads = len(blocks), blocks[0].attn.num_heads
    r = tap.final
    mu, sigma = (stat[:, None] for stat in layer_norm_stats(ln, r))
    offset = ln.bias @ proj - (mu / sigma) * (ln.weight @ proj)  # [batch embed]
    early = [layer for layer in range(n_layers) if layer not in set(keep)]
    if shares == "split":
        ablated = sum(tap.mlp[layer] for layer in range(n_layers)) + sum(
            (tap.attn[layer] for layer in early), torch.zeros_like(r))
        share = (n_layers + len(early)) / (2 * n_layers + 1)
    else:
        # LayerScale (open_clip's ls_1: Identity or a per-channel gamma) scales the bias like the heads.
        ablated = sum(tap.mlp[layer] for layer in range(n_layers)) + sum(
            (tap.attn[layer] - getattr(blocks[layer].ls_1, "gamma", 1.0) * blocks[layer].attn.out_proj.bias
             for layer in early), torch.zeros_like(r))
        share = (n_layers + len(early) * n_heads) / (1 + 2 * n_layers + n_layers * n_heads)
    ablated = (ablated * ln.weight) @ proj / sigma + offset * share
    return embedding - ablated + ablated.mean(0, keepdim=True).detach()


# property → (its values in the world, the text template of a value)
PLANTED_PROPERTIES = {"colour": (tuple(world.COLOURS), "a {} shape"), "shape": (world.SHAPES, "a {}")}


def planted_roles(spec: str) -> tuple[tuple[int, int, str], ...]:
    """((layer, head, property), …) of a `planted_heads` string such as "L3H3=colour,L2H2=shape"."""
    out = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        head, _, prop = item.partition("=")
        try:
            layer, index = (int(x) for x in head.strip().upper().removeprefix("L").split("H"))
        except ValueError:
            raise ConfigError(f"planted_heads entries are LxHy=property, got {item!r}") from None
        if prop not in PLANTED_PROPERTIES:
            raise ConfigError(f"planted_heads property must be one of {', '.join(PLANTED_PROPERTIES)}, got {prop!r}")
        out.append((layer, index, prop))
    return tuple(out)


class HeadTap:
    """Captures, during ``encode_image``, the input of the attention (ln_1's output) of `layers`, from
    which `head_writes` recomputes each head's write to the class token, differentiably."""

    def __init__(self, visual: torch.nn.Module, layers: Sequence[int]):
        self.visual, self.layers, self.inputs, self._handles = visual, tuple(sorted(set(layers))), {}, []

    def __enter__(self) -> "HeadTap":
        for layer in self.layers:
            block = self.visual.transformer.resblocks[layer]
            self._handles.append(block.ln_1.register_forward_hook(self._keep(layer)))
        return self

    def _keep(self, layer: int):
        def hook(module, inputs, output):
            self.inputs[layer] = output
        return hook

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def head_writes(self, layer: int) -> Float[Tensor, "batch head width"]:
        """Per head, its write to the class token's residual: the head's output through its slice of the
        out-projection, plus 1/H of the out-projection bias (the `split` convention), after LayerScale."""
        block = self.visual.transformer.resblocks[layer]
        attn, y = block.attn, self.inputs[layer]
        batch, tokens, width = y.shape
        n_heads = attn.num_heads
        e = width // n_heads
        q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).reshape(batch, tokens, 3, n_heads, e).unbind(2)
        weights = (torch.einsum("bhe,bthe->bht", q[:, 0], k) * e**-0.5).softmax(-1)
        out = torch.einsum("bht,bthe->bhe", weights, v)
        writes = torch.einsum("bhe,whe->bhw", out, attn.out_proj.weight.reshape(width, n_heads, e))
        writes = writes + attn.out_proj.bias / n_heads
        return writes * getattr(block.ls_1, "gamma", 1.0)


def planted_loss(model: torch.nn.Module, tap: ClassTokenTap, heads: HeadTap, roles: Sequence[tuple[int, int, str]],
                 scenes: Sequence[world.Scene], tokenizer) -> Tensor:
    """Σ over the planted heads of the cross-entropy of the head's own direct effect on the embedding (alone,
    uncentred: to score well its variation must dominate its mean, which the dot-product neighbours and
    the topic maps of CLIP-InterpreT need) against the texts of its property's values, the target spread
    over the values present in the scene (every object's colour, or shape)."""
    visual = model.visual
    _, sigma = layer_norm_stats(visual.ln_post, tap.final)
    total = sigma.new_zeros(())
    for prop in sorted({p for _, _, p in roles}):
        values, template = PLANTED_PROPERTIES[prop]
        texts = F.normalize(model.encode_text(tokenizer([template.format(v) for v in values])), dim=-1)
        target = torch.zeros(len(scenes), len(values))
        for i, scene in enumerate(scenes):
            for obj in scene.objects:
                target[i, values.index(getattr(obj, prop))] = 1.0
        target = target / target.sum(1, keepdim=True)
        for layer, head, _ in (r for r in roles if r[2] == prop):
            own = (heads.head_writes(layer)[:, head] * visual.ln_post.weight) @ visual.proj / sigma[:, None]
            logits = model.logit_scale.exp() * F.normalize(own, dim=-1) @ texts.T
            total = total + torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
    return total


# ----------------------------------------------------------------------------------------------
# Training


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay to `min_lr` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = (step - config.warmup_steps) / span
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Per tower (``visual`` / text / the logit scale), with open_clip's decay convention: no
    decay on gains, biases, the token embedding and the logit scale."""
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        tower = "image" if name.startswith("visual.") else "scale" if name == "logit_scale" else "text"
        decay = not (param.ndim < 2 or "ln" in name or "bias" in name or tower == "scale" or "token_embedding" in name)
        groups.setdefault((tower, decay), []).append(param)
    return [{"params": params, "tower": tower, "weight_decay": weight_decay if decay else 0.0}
            for (tower, decay), params in sorted(groups.items())]


def train(config: TrainConfig = TrainConfig(), *, log: Callable[[str], None] = print, log_every: int = 50,
          eval_every: int = 0) -> tuple[LoadedModel, dict]:
    """Train from the seeded init; returns the model (eval mode, fp32) and a summary.

    Batches are generated one step ahead in a background thread (torch releases the GIL in its
    kernels, so generation overlaps the forward/backward); they depend on the step index only.
    ``eval_every`` > 0 logs held-out zero-shot accuracy every that many steps (no effect on weights).
    """
    from clipscope.pipelines.data.prefetch import prefetch

    config = config.validated()
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    loaded = load_model(config.model, config.init_checkpoint or "none", seed=config.seed)
    model = loaded.model
    if config.pos_init_std and not config.init_checkpoint:
        # open_clip draws the positional embedding with σ = width^-0.5 (0.125 here), a small
        # perturbation of the patch content after ln_pre; a ViT this small then sits on a long
        # plateau before it uses position at all (measured: no progress on position or shape in
        # 400 steps; with σ = 1 position is learnt in ~100 steps and shape follows).
        generator = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            pos = model.visual.positional_embedding
            pos.copy_(torch.randn(pos.shape, generator=generator) * config.pos_init_std)
    n_layers = len(model.visual.transformer.resblocks)
    if config.readout_weight and not 1 <= config.readout_layers <= n_layers:
        raise ConfigError(f"readout_layers must be in [1, {n_layers}] ({config.model} has {n_layers} layers), "
                          f"got {config.readout_layers}")
    readout = tuple(range(n_layers - config.readout_layers, n_layers)) if config.readout_weight else ()
    tap = ClassTokenTap(model.visual)
    roles = planted_roles(config.planted_heads) if config.planted_weight else ()
    for layer, head, _ in roles:
        if not (0 <= layer < n_layers and 0 <= head < model.visual.transformer.resblocks[layer].attn.num_heads):
            raise ConfigError(f"planted_heads: {config.model} has no head L{layer}H{head}")
    head_tap = HeadTap(model.visual, [layer for layer, _, _ in roles])
    model.train()
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    probe_world = dataclasses.replace(config.world(loaded.image_size[0]), counts=(1,))
    probe = list(world.generate_scenes(200, 999, config=probe_world))
    batches = prefetch((training_batch(step, config, loaded) for step in range(config.steps)), 2)
    began, losses, grad_norms = time.perf_counter(), [], []
    for step, (images, tokens, positives, scenes) in enumerate(batches):
        for group in optimizer.param_groups:
            slow = group["tower"] == "text" and step < config.text_slow_steps
            group["lr"] = (config.text_lr_scale if slow else 1.0) * learning_rate(step, config)
        with tap if readout or roles else contextlib.nullcontext(), head_tap:
            embedding = model.encode_image(images)
        text_features = F.normalize(model.encode_text(tokens), dim=-1)
        scale = model.logit_scale.exp()
        loss = multi_positive_infonce(F.normalize(embedding, dim=-1), text_features, scale, positives)
        if readout:
            kept = F.normalize(keep_last_embedding(model.visual, tap, embedding, readout, shares=config.readout_shares),
                               dim=-1)
            loss = loss + config.readout_weight * multi_positive_infonce(kept, text_features, scale, positives)
        if roles:
            loss = loss + config.planted_weight * planted_loss(model, tap, head_tap, roles, scenes, loaded.tokenizer)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm or math.inf).item())
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == config.steps):
            seconds = time.perf_counter() - began
            log(f"step {step + 1}/{config.steps} loss {np.mean(losses[-log_every:]):.4f} "
                f"grad norm {np.mean(grad_norms[-log_every:]):.2f} scale {model.logit_scale.exp().item():.1f} lr {learning_rate(step, config):.2e} "
                f"{(step + 1) * config.batch_size / seconds:.0f} img/s, {seconds:.0f} s")
        if eval_every and (step + 1) % eval_every == 0:
            model.eval()
            acc = zero_shot_accuracy(loaded, probe)
            heads = mean_ablation(loaded, probe, last_layers=config.readout_layers)["keep_last_heads"]
            model.train()
            log(f"step {step + 1}: probe zero-shot " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items() if "any" not in k)
                + f"; only the last {config.readout_layers} layers' heads: " + ", ".join(f"{k} {heads[k]:.3f}" for k in ("colour_acc", "shape_acc")))
    model.eval()
    summary = {"seconds": time.perf_counter() - began,
               "final_loss": float(np.mean(losses[-log_every or 1:])), "config": asdict(config)}
    return loaded, summary


# ----------------------------------------------------------------------------------------------
# Checkpoint


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike, config: TrainConfig) -> str:
    """Write the fp16 state dict as safetensors; returns its `content_digest`."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().to(torch.float16).contiguous() for name, tensor in model.state_dict().items()}
    metadata = {"clipscope_model": config.model, "train_config": json.dumps(config.record(), sort_keys=True),
                "generator_version": str(world.GENERATOR_VERSION), "dtype": "float16"}
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return content_digest(path)


def content_digest(path: str | os.PathLike) -> str:
    """sha256 of a safetensors file's content: every tensor's name, dtype, shape and bytes in name
    order, then the metadata with sorted keys. The file's own bytes are not reproducible: safetensors
    writes the metadata keys in hash-map order, which changes from run to run."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt") as fh:
        for name in sorted(fh.keys()):
            tensor = fh.get_tensor(name).contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.numpy().tobytes())
        digest.update(json.dumps(fh.metadata() or {}, sort_keys=True).encode())
    return digest.hexdigest()


def checkpoint_metadata(path: str | os.PathLike = CHECKPOINT) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def load_shapes_model(device: str | torch.device = "cpu", path: str | os.PathLike | None = None) -> LoadedModel:
    """The shipped shapes-world CLIP (`clipscope-shapes`), in eval mode, fp32 (values fp16-exact)."""
    path = pathlib.Path(path) if path is not None else CHECKPOINT
    if not path.is_file():
        raise ModelError(f"shapes model checkpoint not found: {path}; run `python -m clipscope.pipelines.worlds.shapes.train`")
    name = checkpoint_metadata(path).get("clipscope_model", SHAPES_MODEL)
    return load_model(name, str(path), device=device)


# ----------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m clipscope.pipelines.worlds.shapes.train",
                                     description="Train the shapes-world CLIP and write its fp16 checkpoint.")
    parser.add_argument("--out", default=str(CHECKPOINT), help=f"checkpoint path (default: {CHECKPOINT})")
    parser.add_argument("--check", action="store_true",
                        help="retrain into a temporary file and compare its content (tensors and metadata) "
                             "with --out (the shipped file)")
    parser.add_argument("--eval-seed", type=int, default=2, help="world seed of the held-out evaluation")
    parser.add_argument("--log-json", help="also write the summary (timing, evaluation) to this JSON file")
    parser.add_argument("--eval-every", type=int, default=0, help="log held-out zero-shot accuracy every N steps")
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    config = TrainConfig(**{f: getattr(args, f) for f in asdict(defaults)})
    try:
        config = config.validated()
        began_cpu = time.process_time()
        loaded, summary = train(config, log=lambda line: print(line, flush=True), eval_every=args.eval_every)
        summary["cpu_seconds"] = time.process_time() - began_cpu
        target = pathlib.Path(args.out)
        if args.check:
            fresh = target.with_name(f".check-{target.name}")
            digest = save_checkpoint(loaded.model, fresh, config)
            shipped = content_digest(target) if target.is_file() else None
            fresh.unlink()
            summary.update(content_sha256=digest, shipped_content_sha256=shipped, identical=digest == shipped)
        else:
            summary["content_sha256"] = save_checkpoint(loaded.model, target, config)
            summary["sha256"] = sha256_file(target)
            summary["bytes"] = target.stat().st_size
            loaded = load_shapes_model(path=target)  # evaluate what ships: fp16-rounded weights
        summary["evaluation"] = evaluate(loaded, seed=args.eval_seed)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    if args.log_json:
        pathlib.Path(args.log_json).write_text(json.dumps(summary, indent=1))
    if args.check and not summary["identical"]:
        print(f"checkpoint content differs from {target}: {summary['content_sha256']} vs "
              f"{summary['shipped_content_sha256']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
