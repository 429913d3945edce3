"""Model registry and loading: open_clip name + pretrained tag, a local checkpoint, or random init.

`--pretrained` takes a tag (``openai``, ``laion2b_s34b_b79k``, …), a checkpoint path
(``.pt``/``.pth``/``.bin``/``.safetensors``) or ``none`` (random init, seeded). A model name may
also be ``local-dir:/path`` (an open_clip model folder) or ``hf-hub:org/repo``. The tiny configs in
``model_configs/`` (``clipscope-tiny*``) are registered with open_clip on first use, for tests and
the shapes world.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import os
import pathlib
import socket
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from clipscope._torchvision_compat import import_open_clip
from clipscope.errors import ModelError, StoreError
from clipscope.kernels.vit import ViTSpec
from clipscope.pipelines.models.open_clip_adapter import vit_spec_from_open_clip
from clipscope.storage.store import RunStore

_log = logging.getLogger(__name__)
CONFIG_DIR = pathlib.Path(__file__).parent / "model_configs"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_registered = False


def _open_clip():
    global _registered
    open_clip = import_open_clip()
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True
    return open_clip


def list_models() -> list[str]:
    """Every architecture name `load_model` accepts (open_clip's plus clipscope's tiny configs)."""
    return list(_open_clip().list_models())


def unsupported_reason(name: str) -> str | None:
    """Why extraction refuses architecture `name` (None: it is supported), read from its open_clip
    config without building the model. Mirrors what `vit_spec_from_open_clip` refuses at load time:
    clipscope decomposes open_clip's own ViT with class-token pooling."""
    cfg = _open_clip().get_model_config(name)
    if cfg is None:
        return "unknown architecture"
    vision = cfg.get("vision_cfg") or {}
    if vision.get("timm_model_name"):
        return f"timm image tower ({vision['timm_model_name']})"
    if isinstance(vision.get("layers"), (list, tuple)):
        return "ResNet image tower"
    if vision.get("attentional_pool"):
        return "attention pooling"
    if vision.get("pool_type", "tok") != "tok":
        return f"pool_type {vision['pool_type']} (only class-token pooling is decomposed)"
    return None


def list_tiny_models() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def list_pretrained_tags(name: str) -> list[str]:
    return list(_open_clip().list_pretrained_tags_by_model(name))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class LoadedModel:
    """A loaded CLIP model with what a run needs to use and to identify it."""

    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    identity: dict[str, Any]
    _spec: ViTSpec | None = field(default=None, repr=False)

    @property
    def spec(self) -> ViTSpec:
        if self._spec is None:
            self._spec = vit_spec_from_open_clip(self.model.visual)
        return self._spec

    @property
    def image_size(self) -> tuple[int, int]:
        return self.spec.image_size


def _check_name(open_clip, name: str) -> None:
    if name.startswith(("hf-hub:", "local-dir:")):
        return
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `clipscope models`"
        raise ModelError(f"unknown model {name!r}{hint}")


def _is_checkpoint(pretrained: str) -> bool:
    return pretrained.lower().endswith(CHECKPOINT_SUFFIXES) or os.path.sep in pretrained or os.path.exists(pretrained)


def load_model(name: str, pretrained: str = "none", *, device: str | torch.device = "cpu", seed: int = 0) -> LoadedModel:
    """Load `name` with weights from `pretrained` (tag, checkpoint path or ``none``), in eval mode."""
    open_clip = _open_clip()
    _check_name(open_clip, name)
    identity: dict[str, Any] = {"name": name, "pretrained": pretrained, "sha256": None,
                                "open_clip_version": open_clip.__version__}
    if name.startswith("local-dir:"):
        folder = pathlib.Path(name[len("local-dir:"):]).expanduser()
        if not folder.is_dir():
            raise ModelError(f"{name}: no such folder; local-dir: names an open_clip model folder "
                             "(open_clip_config.json and the weights)")
        if not (folder / "open_clip_config.json").is_file():
            raise ModelError(f"{name}: the folder holds no open_clip_config.json; is it an open_clip model folder?")
        model, preprocess = _create(open_clip, name, None, device, seed)
    elif name.startswith("hf-hub:"):
        model, preprocess = _create_from_hub(open_clip, name, None, device, seed)
    elif pretrained in ("none", "", None):
        identity["pretrained"] = "none"
        identity["seed"] = seed
        model, preprocess = _create(open_clip, name, None, device, seed)
    elif _is_checkpoint(pretrained):
        path = pathlib.Path(pretrained).expanduser()
        if not path.is_file():
            raise ModelError(f"checkpoint {path} is not a regular file" if path.exists()
                             else f"checkpoint not found: {path}")
        identity["pretrained"] = str(path.resolve())
        identity["sha256"] = sha256_file(path)
        model, preprocess = _create(open_clip, name, None, device, seed)
        try:
            open_clip.load_checkpoint(model, str(path), device=device)
        except (RuntimeError, KeyError, ValueError) as err:
            first = str(err).strip().splitlines()
            detail = next((line.strip() for line in first if line.strip()), type(err).__name__)
            raise ModelError(f"checkpoint {path} does not match architecture {name}: {detail[:300]}") from None
        except Exception as err:  # unpickling / safetensors header errors
            raise ModelError(f"cannot read checkpoint {path}: {type(err).__name__}: {str(err)[:200]}") from None
    else:
        tags = list_pretrained_tags(name)
        if pretrained not in tags:
            listed = ", ".join(tags) if tags else "none are published for this architecture"
            raise ModelError(f"unknown pretrained tag {pretrained!r} for {name}; known tags: {listed}")
        model, preprocess = _create_from_hub(open_clip, name, pretrained, device, seed)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    loaded = LoadedModel(model=model, preprocess=preprocess, tokenizer=tokenizer, identity=identity)
    loaded.spec  # refuse unsupported image towers at load time, not mid-run
    return loaded


def hub_host() -> str:
    """The host pretrained weights come from (``HF_ENDPOINT`` or huggingface.co)."""
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return urllib.parse.urlsplit(endpoint).hostname or "huggingface.co"


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connection to the hub's port 443: False when no network reaches it."""
    try:
        socket.create_connection((hub_host(), 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """Put huggingface_hub in offline mode (cache only, no retries) for the block when asked."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    quiet = _DropDownloadErrors()
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
        logging.getLogger().removeFilter(quiet)


class _DropDownloadErrors(logging.Filter):
    # open_clip logs the hub's long download error before raising; the one-line ModelError says it.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to download" not in record.getMessage()


def _create_from_hub(open_clip, name: str, pretrained: str | None, device, seed: int):
    """Weights from the hub (a pretrained tag, an ``hf-hub:`` model); fails at once when offline.

    Without a network (``HF_HUB_OFFLINE`` set, or the hub unreachable) only the local cache is
    tried, so an offline run fails in a second with one line instead of retrying for a minute.
    """
    from huggingface_hub import constants

    what = name if pretrained is None else f"{name}/{pretrained}"
    offline = bool(constants.HF_HUB_OFFLINE) or not hub_reachable()
    try:
        with _hub_offline(offline):
            return _create(open_clip, name, pretrained, device, seed)
    except Exception as err:
        if offline:
            raise ModelError(
                f"no network reaches {hub_host()} and the weights of {what} are not in the local cache: "
                "pass a local checkpoint with --pretrained /path/to/checkpoint.pt"
            ) from None
        raise ModelError(
            f"cannot fetch pretrained weights {what} ({type(err).__name__}: {str(err)[:120]}): "
            "pass a local checkpoint with --pretrained /path/to/checkpoint.pt"
        ) from None


class _DropRandomInitNotice(logging.Filter):
    # open_clip warns on every random init; for `--pretrained none` that is the request, not news.
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _create(open_clip, name: str, pretrained: str | None, device, seed: int):
    notice = _DropRandomInitNotice()
    root = logging.getLogger()
    root.addFilter(notice)
    try:
        return _create_seeded(open_clip, name, pretrained, device, seed)
    finally:
        root.removeFilter(notice)


def _create_seeded(open_clip, name: str, pretrained: str | None, device, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    return model, preprocess


def is_random_init(model: dict[str, Any] | None) -> bool:
    """True for a model identity (a store's `model` attribute) whose weights were never trained:
    `--pretrained none` on an open_clip architecture (hub and local-dir models carry their weights)."""
    if not model:
        return False
    name = str(model.get("name", ""))
    return str(model.get("pretrained", "none")).lower() in ("none", "") and not name.startswith(("hf-hub:",
                                                                                              "local-dir:"))


def random_init_text(model: dict[str, Any]) -> str:
    return (f"RANDOM-INIT WEIGHTS: model {model.get('name')} with --pretrained none (seed {model.get('seed', 0)}) "
            f"was never trained, so the heads, texts, neurons and accuracies computed from it describe noise, "
            f"not a model; pass --pretrained TAG|CHECKPOINT to extract a trained one")


def load_run_model(store: RunStore) -> LoadedModel:
    """The model a store was extracted with, checked against its recorded identity."""
    model = store.attrs.get("model") or {}
    if "name" not in model:
        raise StoreError(f"{store.url} records no model identity; cannot encode text for it")
    pretrained = model.get("pretrained", "none")
    if model.get("sha256"):
        # The store names a checkpoint file: say which one is loaded, and only a regular file.
        path = pathlib.Path(str(pretrained))
        if not path.is_file():
            what = "does not exist" if not path.exists() else "is not a regular file"
            raise StoreError(f"checkpoint {path} recorded by {store.url} {what}; "
                             "restore it (the store records its sha256) to run reductions")
        _log.info("loading the checkpoint recorded by %s: %s (sha256 %s…)", store.url, path, model["sha256"][:12])
    loaded = load_model(model["name"], pretrained, seed=model.get("seed", 0))
    if model.get("sha256") and loaded.identity.get("sha256") != model["sha256"]:
        raise StoreError(f"checkpoint {model['pretrained']} changed since {store.url} was extracted (sha256 differs)")
    return loaded
