"""Zoo models for `clipscope maps`: any torch vision network, its hooked layers, one shared field of view.

A zoo spec names the network:

- ``torchvision:NAME`` — ``torchvision.models.get_model(NAME, weights=None)`` (random init, seeded), or a
  state dict from ``--checkpoint``; ResNets default to ``layer1 … layer4`` (post-ReLU stage outputs);
- ``open_clip:NAME`` — the image tower of an open_clip model (random init, or ``--checkpoint``): ViTs hook
  ``transformer.resblocks.{i}.mlp.gelu`` (post-activation hidden units), ModifiedResNets ``layer1 … layer4``;
- ``timm:NAME`` — when timm is installed (``pretrained=False``; ``--checkpoint``): ViTs hook
  ``blocks.{i}.mlp.act``, prefix tokens ``num_prefix_tokens``;
- ``python:pkg.module:factory`` — ``factory(seed=…, checkpoint=…)`` returns a `Network`; how a user brings
  a GAN discriminator or their own network;
- names registered with `register_zoo_model` (the shapes world registers ``shapes-oracle`` and
  ``shapes-cnn`` through its plugin).

Field of view (`geometry` S): every image is resized (shorter side to S, bicubic) and centre-cropped to
S × S, then bicubically resized to the network's input size and normalised with its mean/std. With S
equal to an open_clip model's input size this is exactly its own preprocess. Hooks are forward hooks on
the named modules; a token output [B, T, C] drops its prefix tokens and is reshaped to the model's
patch grid (gh, gw), not √T, so non-square grids work.
"""

from __future__ import annotations

import hashlib
import importlib
import pathlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from clipscope.errors import ConfigError, ModelError, ParameterError, literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Network:
    """A network and how to feed it: what a ``python:`` factory returns.

    `layers`: the default hooked module names; `token_grid`: (gh, gw) for token models (outputs [B, T, C]
    with `prefix_tokens` leading tokens, or [T, B, C] when `tokens_first`); `sample_input(raw, image)`:
    builds the network's input from a raw webdataset sample and the field-of-view image tensor (e.g. an
    oracle reading the sample's JSON); None feeds the normalised image.
    """

    module: torch.nn.Module
    layers: tuple[str, ...]
    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    token_grid: tuple[int, int] | None = None
    prefix_tokens: int = 0
    tokens_first: bool = False
    sample_input: Callable[[Any, torch.Tensor], torch.Tensor] | None = None
    input_channels: int = 3  # channels of `sample_input`'s output (a zero probe of that shape learns the maps' shapes)
    description: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, Callable[..., Network]] = {}


def register_zoo_model(name: str, factory: Callable[..., Network], *, replace: bool = False) -> None:
    """Make `name` a zoo spec: ``factory(seed=…, checkpoint=…)`` returns its `Network`."""
    if name in _REGISTRY and not replace:
        raise ConfigError(f"zoo model {name!r} is already registered")
    _REGISTRY[name] = factory


def registered_zoo_models() -> list[str]:
    from clipscope.pipelines.texts.plugins import load_plugins

    load_plugins()
    return sorted(_REGISTRY)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict(module: torch.nn.Module, checkpoint: str, spec: str) -> None:
    path = pathlib.Path(checkpoint).expanduser()
    if not path.is_file():
        raise ModelError(f"{{checkpoint}} {literal(checkpoint)}: no such file", parameters=("checkpoint",))
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except (RuntimeError, KeyError, ValueError, OSError) as err:
        detail = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ModelError(f"{{checkpoint}} {literal(checkpoint)} does not fit {literal(spec)}: {literal(detail[:300])}",
                         parameters=("checkpoint",)) from None


def _torchvision(name: str, seed: int, checkpoint: str | None) -> Network:
    from clipscope._torchvision_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torchvision

    if name not in torchvision.models.list_models():
        raise ConfigError(f"torchvision:{name}: torchvision has no model {name!r}")
    torch.manual_seed(seed)
    module = torchvision.models.get_model(name, weights=None)
    if checkpoint is not None:
        load_state_dict(module, checkpoint, f"torchvision:{name}")
    names = dict(module.named_modules())
    layers = tuple(f"layer{i}" for i in range(1, 5) if f"layer{i}" in names)
    return Network(module, layers, (224, 224), IMAGENET_MEAN, IMAGENET_STD)


def _open_clip(name: str, seed: int, checkpoint: str | None) -> Network:
    from clipscope import import_open_clip
    from clipscope.pipelines.models.loading import list_models, load_model

    open_clip = import_open_clip()
    if name not in list_models():  # (also registers clipscope's own configs)
        raise ConfigError(f"open_clip:{name}: open_clip has no model {name!r}")
    layers = ((open_clip.get_model_config(name) or {}).get("vision_cfg") or {}).get("layers")
    if isinstance(layers, (list, tuple)):  # a ModifiedResNet image tower: clipscope's loader takes ViTs only
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(name, pretrained=None)
        if checkpoint is not None:
            try:
                open_clip.load_checkpoint(model, checkpoint)
            except (RuntimeError, KeyError, ValueError, OSError) as err:
                raise ModelError(f"{{checkpoint}} {literal(checkpoint)} does not fit open_clip:{literal(name)}: "
                                 f"{literal(str(err)[:200])}", parameters=("checkpoint",)) from None
        visual = model.visual
    else:
        visual = load_model(name, checkpoint or "none", seed=seed).model.visual
    size = visual.image_size if isinstance(visual.image_size, tuple) else (visual.image_size, visual.image_size)
    if hasattr(visual, "transformer"):
        n = len(visual.transformer.resblocks)
        grid = tuple(visual.grid_size)
        return Network(visual, tuple(f"transformer.resblocks.{i}.mlp.gelu" for i in range(n)), tuple(size),
                       CLIP_MEAN, CLIP_STD, token_grid=(int(grid[0]), int(grid[1])), prefix_tokens=1,
                       tokens_first=not getattr(visual.transformer, "batch_first", True))
    return Network(visual, tuple(f"layer{i}" for i in range(1, 5)), tuple(size), CLIP_MEAN, CLIP_STD)


def _timm(name: str, seed: int, checkpoint: str | None) -> Network:
    from clipscope._torchvision_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    try:
        import timm
    except ImportError:
        raise ConfigError(f"timm:{name}: timm is not installed (pip install timm)") from None
    torch.manual_seed(seed)
    try:
        module = timm.create_model(name, pretrained=False)
    except RuntimeError as err:
        raise ConfigError(f"timm:{name}: {err}") from None
    if checkpoint is not None:
        load_state_dict(module, checkpoint, f"timm:{name}")
    cfg = getattr(module, "pretrained_cfg", {}) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224))[1:])
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    if hasattr(module, "blocks") and hasattr(module, "patch_embed"):
        grid = tuple(int(g) for g in module.patch_embed.grid_size)
        layers = tuple(f"blocks.{i}.mlp.act" for i in range(len(module.blocks)))
        return Network(module, layers, size, mean, std, token_grid=grid,
                       prefix_tokens=int(getattr(module, "num_prefix_tokens", 1)))
    names = dict(module.named_modules())
    return Network(module, tuple(f"layer{i}" for i in range(1, 5) if f"layer{i}" in names), size, mean, std)


def _python(target: str, seed: int, checkpoint: str | None) -> Network:
    module_name, _, attr = target.rpartition(":")
    if not module_name or not attr:
        raise ConfigError(f"python:{target}: expected python:pkg.module:factory")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"python:{target}: {err}") from None
    network = factory(seed=seed, checkpoint=checkpoint)
    if not isinstance(network, Network):
        raise ConfigError(f"python:{target} must return a clipscope Network, got {type(network).__name__}")
    return network


def build_network(spec: str, *, seed: int = 0, checkpoint: str | None = None) -> Network:
    """The `Network` a zoo spec names (ConfigError naming the spec when it cannot be built)."""
    kind, _, name = spec.partition(":")
    builders = {"torchvision": _torchvision, "open_clip": _open_clip, "timm": _timm, "python": _python}
    if kind in builders and name:
        return builders[kind](name, seed, checkpoint)
    registered = registered_zoo_models()
    if spec in _REGISTRY:
        return _REGISTRY[spec](seed=seed, checkpoint=checkpoint)
    raise ParameterError("zoo", f"{spec!r}: expected torchvision:NAME, open_clip:NAME, timm:NAME, "
                                f"python:pkg.module:factory or one of {', '.join(registered) or '(none registered)'}")


def field_of_view(image, geometry: int) -> torch.Tensor:
    """[3, S, S] in [0, 1]: shorter side resized to S (bicubic, antialiased), centre crop S × S."""
    from clipscope._torchvision_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from torchvision import transforms

    image = image.convert("RGB") if image.mode != "RGB" else image
    step = transforms.Compose([
        transforms.Resize(geometry, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(geometry), transforms.ToTensor()])
    return step(image)


class Tap:
    """Forward hooks on named modules of a network: `capture(inputs)` → {layer: [B, C, h, w] float32}."""

    def __init__(self, network: Network, layers: tuple[str, ...]):
        self.network = network
        modules = dict(network.module.named_modules())
        unknown = [name for name in layers if name not in modules]
        if unknown:
            shown = ", ".join(n for n in list(modules)[1:12] if n)
            raise ConfigError(f"{{layers}}: the network has no module {literal(repr(unknown[0]))}; some of its "
                              f"modules: {literal(shown)}", parameters=("layers",))
        self.layers = layers
        self._values: dict[str, torch.Tensor] = {}
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in layers]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self._values[name] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def as_map(self, value: torch.Tensor, batch: int) -> torch.Tensor:
        net = self.network
        if value.ndim == 4:
            return value
        if value.ndim != 3 or net.token_grid is None:
            raise ConfigError(f"a hooked output of shape {tuple(value.shape)} is neither [B, C, H, W] nor tokens "
                              "of a model with a token grid")
        tokens = value.transpose(0, 1) if net.tokens_first else value
        gh, gw = net.token_grid
        if tokens.shape[0] != batch or tokens.shape[1] != net.prefix_tokens + gh * gw:
            raise ConfigError(f"token output {tuple(value.shape)} does not hold {net.prefix_tokens} prefix + "
                              f"{gh}×{gw} grid tokens for a batch of {batch}")
        grid = tokens[:, net.prefix_tokens:]
        return grid.reshape(batch, gh, gw, grid.shape[-1]).permute(0, 3, 1, 2)

    @torch.no_grad()
    def capture(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        self._values.clear()
        self.network.module(inputs)
        missing = [name for name in self.layers if name not in self._values]
        if missing:
            raise ConfigError(f"{{layers}}: module {literal(repr(missing[0]))} did not run in the forward pass",
                              parameters=("layers",))
        return {name: self.as_map(self._values[name], inputs.shape[0]).float() for name in self.layers}


def model_inputs(network: Network, raw, image, geometry: int) -> torch.Tensor:
    """One sample's network input: the field of view, resized to the input size, normalised (or the
    network's own `sample_input`)."""
    view = field_of_view(image, geometry)
    if network.sample_input is not None:
        return network.sample_input(raw, view)
    if tuple(view.shape[1:]) != tuple(network.input_size):
        view = F.interpolate(view[None], size=tuple(network.input_size), mode="bicubic", align_corners=False,
                             antialias=True)[0]
    mean = torch.tensor(network.mean, dtype=view.dtype)[:, None, None]
    std = torch.tensor(network.std, dtype=view.dtype)[:, None, None]
    return (view - mean) / std
