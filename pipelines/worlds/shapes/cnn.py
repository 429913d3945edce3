"""`shapes-cnn`: a small supervised CNN of the shapes world (Rosetta's second trained model, S3 item 3).

Four stages of (conv3×3-BN-ReLU)×2 with 16/32/64/128 channels, stride 2 at each stage's first conv, so
the stage maps are 24/12/6/3 at 48 px (multi-resolution groups against the ViT's 6×6); heads for the
main object's colour (8), shape (7) and cell (9) on the pooled last stage. Trained by
`clipscope shapes train-cnn` on fresh scenes (seeded, deterministic, 2 threads) and shipped as an fp16
safetensors asset with the same content digest check as the shapes CLIP. `shapes-cnn` is the trained
network; `shapes-cnn-random` a seeded random init of the same architecture (the control).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from clipscope.errors import ConfigError, ModelError, ParameterError
from clipscope.pipelines.jobs.maps.zoo import IMAGENET_MEAN, IMAGENET_STD, Network, load_state_dict
from clipscope.pipelines.worlds.shapes import world
from clipscope.pipelines.worlds.shapes.train import ASSET_DIR, content_digest

CNN_CHECKPOINT = ASSET_DIR / "shapes-cnn.safetensors"
CHANNELS = (16, 32, 64, 128)
STAGES = tuple(f"stage{i}" for i in range(1, 5))


def _stage(cin: int, cout: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), torch.nn.BatchNorm2d(cout),
        torch.nn.ReLU(inplace=False),
        torch.nn.Conv2d(cout, cout, 3, padding=1, bias=False), torch.nn.BatchNorm2d(cout), torch.nn.ReLU(inplace=False))


class ShapesCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        widths = (3, *CHANNELS)
        for i, name in enumerate(STAGES):
            self.add_module(name, _stage(widths[i], widths[i + 1]))
        self.colour = torch.nn.Linear(CHANNELS[-1], len(world.COLOURS))
        self.shape = torch.nn.Linear(CHANNELS[-1], len(world.SHAPES))
        self.cell = torch.nn.Linear(CHANNELS[-1], world.GRID * world.GRID)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = images
        for name in STAGES:
            x = getattr(self, name)(x)
        pooled = x.mean(dim=(2, 3))
        return self.colour(pooled), self.shape(pooled), self.cell(pooled)


@dataclass(frozen=True)
class CNNTrainConfig:
    steps: int = 500
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    world_seed: int = 11
    threads: int = 2

    def validated(self) -> "CNNTrainConfig":
        for name in ("steps", "batch_size", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParameterError(name, f"must be an integer ≥ 1, got {value!r}")
        if not self.lr > 0:
            raise ParameterError("lr", f"must be > 0, got {self.lr!r}")
        return self


def normalise(images: np.ndarray) -> torch.Tensor:
    """[B, H, W, 3] uint8 → [B, 3, H, W] ImageNet-normalised float32 (what `maps` feeds at geometry 48)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD)[None, :, None, None]
    return (x - mean) / std


def batch(step: int, config: CNNTrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    scenes = list(world.generate_scenes(config.batch_size, config.world_seed, start=step * config.batch_size))
    images = normalise(np.stack([s.image for s in scenes]))
    labels = torch.tensor([[list(world.COLOURS).index(s.main.colour), world.SHAPES.index(s.main.shape),
                            s.main.cell[0] * world.GRID + s.main.cell[1]] for s in scenes])
    return images, labels


def train_cnn(config: CNNTrainConfig = CNNTrainConfig(), *, log=print) -> tuple[ShapesCNN, dict]:
    """Train from the seeded init on fresh scenes; returns the model (eval mode) and a summary."""
    from clipscope.pipelines.data.prefetch import prefetch

    config = config.validated()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(config.seed)
        model = ShapesCNN()
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
        model.train()
        began, losses = time.perf_counter(), []
        for step, (images, labels) in enumerate(prefetch((batch(s, config) for s in range(config.steps)), 2)):
            for group in optimizer.param_groups:  # linear warm-up, cosine decay
                warm = min(1.0, (step + 1) / 25)
                group["lr"] = config.lr * warm * 0.5 * (1 + np.cos(np.pi * step / config.steps))
            colour, shape, cell = model(images)
            loss = (F.cross_entropy(colour, labels[:, 0]) + F.cross_entropy(shape, labels[:, 1])
                    + F.cross_entropy(cell, labels[:, 2]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if (step + 1) % 100 == 0 or step + 1 == config.steps:
                log(f"step {step + 1}/{config.steps} loss {np.mean(losses[-100:]):.4f} "
                    f"{time.perf_counter() - began:.0f} s")
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model, {"seconds": time.perf_counter() - began, "final_loss": float(np.mean(losses[-50:])),
                   "config": asdict(config)}


@torch.no_grad()
def accuracy(model: ShapesCNN, *, seed: int = 12345, n: int = 500) -> dict[str, float]:
    scenes = list(world.generate_scenes(n, seed))
    colour, shape, cell = model(normalise(np.stack([s.image for s in scenes])))
    truth = np.asarray([[list(world.COLOURS).index(s.main.colour), world.SHAPES.index(s.main.shape),
                         s.main.cell[0] * world.GRID + s.main.cell[1]] for s in scenes])
    return {name: float((out.argmax(1).numpy() == truth[:, i]).mean())
            for i, (name, out) in enumerate((("colour", colour), ("shape", shape), ("cell", cell)))}


def save_cnn(model: ShapesCNN, path: str | os.PathLike, config: CNNTrainConfig) -> str:
    from safetensors.torch import save_file

    state = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous()
             for k, v in model.state_dict().items()}
    path = pathlib.Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(state, str(tmp), metadata={"clipscope_model": "shapes-cnn", "dtype": "float16",
                                          "train_config": json.dumps(asdict(config), sort_keys=True),
                                          "generator_version": str(world.GENERATOR_VERSION)})
    os.replace(tmp, path)
    return content_digest(path)


def _network(module: ShapesCNN, description: dict) -> Network:
    return Network(module.eval(), STAGES, (48, 48), IMAGENET_MEAN, IMAGENET_STD, description=description)


def shapes_cnn(seed: int = 0, checkpoint: str | None = None) -> Network:
    """The trained `shapes-cnn` zoo model (the shipped checkpoint, or `checkpoint`)."""
    path = pathlib.Path(checkpoint) if checkpoint else CNN_CHECKPOINT
    if not path.is_file():
        raise ModelError(f"shapes-cnn checkpoint not found: {path}; run `clipscope shapes train-cnn`")
    module = ShapesCNN()
    load_state_dict(module, str(path), "shapes-cnn")
    return _network(module, {"kind": "shapes-world supervised CNN", "weights": str(path),
                             "content_sha256": content_digest(path)})


def shapes_cnn_random(seed: int = 0, checkpoint: str | None = None) -> Network:
    """`shapes-cnn-random`: the same architecture, seeded random init (the trained-vs-random control)."""
    if checkpoint is not None:
        raise ConfigError("shapes-cnn-random is a random init; for weights use shapes-cnn --checkpoint")
    torch.manual_seed(seed)
    return _network(ShapesCNN(), {"kind": "shapes-world CNN, random init", "seed": seed})


def main(argv: Sequence[str] | None = None) -> int:
    defaults = CNNTrainConfig()
    parser = argparse.ArgumentParser(prog="clipscope shapes train-cnn",
                                     description="Train the shapes-world CNN and write its fp16 checkpoint.")
    parser.add_argument("--out", default=str(CNN_CHECKPOINT), help=f"checkpoint path (default: {CNN_CHECKPOINT})")
    parser.add_argument("--check", action="store_true",
                        help="retrain into a temporary file and compare its content digest with --out")
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    config = CNNTrainConfig(**{f: getattr(args, f) for f in asdict(defaults)})
    try:
        model, summary = train_cnn(config.validated(), log=lambda line: print(line, flush=True))
    except ConfigError as err:  # a parameter's name as its flag (`lr` → --lr)
        print(f"error: {err.message_for({f: '--' + f.replace('_', '-') for f in asdict(defaults)})}", file=sys.stderr)
        return 2
    target = pathlib.Path(args.out)
    if args.check:
        fresh = target.with_name(f".check-{target.name}")
        digest = save_cnn(model, fresh, config)
        shipped = content_digest(target) if target.is_file() else None
        fresh.unlink()
        summary.update(content_sha256=digest, shipped_content_sha256=shipped, identical=digest == shipped)
    else:
        summary["content_sha256"] = save_cnn(model, target, config)
        summary["bytes"] = target.stat().st_size
        model = shapes_cnn(checkpoint=str(target)).module  # evaluate what ships: fp16-rounded weights
    summary["accuracy"] = accuracy(model)
    print(json.dumps(summary, indent=1))
    if args.check and not summary["identical"]:
        print(f"checkpoint content differs from {target}", file=sys.stderr)
        return 1
    return 0
