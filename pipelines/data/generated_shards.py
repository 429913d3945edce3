"""Images made by a user's generator (a text-to-image model behind `clipscope cues --generate`), written as a
webdataset shard that `clipscope extract` reads like any other.

A generator is named ``python:package.module:function``; clipscope calls
``function(prompt=str, words=list[str], true=str, wrong=str)`` and takes whatever images it returns (an
iterable of PIL images or [height, width, 3] uint8 arrays). Nothing of the generator is imported before it
is asked for; clipscope ships none (the reference used DeepFloyd IF and FLUX, which need their weights).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from clipscope.errors import ConfigError, ParameterError
from clipscope.pipelines.data.webdataset_input import write_shard


def load_generator(spec: str) -> Callable[..., Iterable[Any]]:
    """The function a ``python:package.module:function`` spec names (ConfigError naming the spec otherwise)."""
    if not isinstance(spec, str) or not spec.startswith("python:") or spec.count(":") != 2:
        raise ParameterError("spec", f"must be python:package.module:function, got {spec!r}")
    module_name, _, attr = spec.removeprefix("python:").partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ParameterError("spec", f"{spec}: cannot import {module_name}: {err}") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ParameterError("spec", f"{spec}: {module_name} has no function {attr!r}")
    return function


def _as_image(image: Any, index: int):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ConfigError(f"the generator's image {index} must be a PIL image or a [height, width, 3] uint8 array, "
                          f"got {array.dtype} {array.shape}")
    return Image.fromarray(array)


def write_generated(path: str, images: Iterable[Any], meta: dict[str, Any], *, prefix: str = "generated") -> int:
    """Write `images` as a shard at `path` (keys PREFIX-000000…, a PNG and `meta` as JSON each); returns the count."""
    samples = ({"__key__": f"{prefix}-{i:06d}", "png": _as_image(image, i), "json": {**meta, "index": i}}
               for i, image in enumerate(images))
    return write_shard(path, samples)
