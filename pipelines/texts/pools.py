"""Named pools of texts (the candidate descriptions TextSpan and OMP choose from).

``get_pool(name, **options)`` builds a `TextPool` from a registered factory; the pool's hash is
the sha256 of its texts (in order), so a store can record which pool a result came from and
refuse a mismatched one. Built in:

  wordfreq-en      the ``top_n`` (default 1000) most frequent English words (``wordfreq``, offline)
  imagenet         ImageNet class names (open_clip's list); ``templates="none"`` (default),
                   ``"simple"`` (open_clip's 7) or ``"openai"`` (the 80), or ``template="..."``
  file:PATH        one text per non-empty line of a UTF-8 file (trailing whitespace stripped)

Worlds and other plugins add their own pools (the shapes world: ``shapes-*``) through the
``clipscope.plugins`` entry point; see `clipscope.pipelines.texts.plugins`.
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Callable
from dataclasses import dataclass

from clipscope.errors import ConfigError, DataError
from clipscope.pipelines.texts.plugins import load_plugins

@dataclass(frozen=True)
class TextPool:
    name: str
    texts: list[str]
    hash: str

    def __len__(self) -> int:
        return len(self.texts)


def pool_hash(texts: list[str]) -> str:
    """sha256 over the texts, each UTF-8 encoded and terminated by a NUL byte (order matters)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


_FACTORIES: dict[str, Callable[..., list[str]]] = {}


def register_pool(name: str, factory: Callable[..., list[str]], *, replace: bool = False) -> None:
    """Register `factory(**options) -> list[str]` under `name` (``file:`` is reserved)."""
    if not isinstance(name, str) or not name or name.startswith("file:"):
        raise ConfigError(f"pool name must be a non-empty string not starting with 'file:', got {name!r}")
    if not callable(factory):
        raise ConfigError(f"pool factory for {name!r} must be callable, got {type(factory).__name__}")
    if name in _FACTORIES and not replace:
        raise ConfigError(f"text pool {name!r} is already registered (pass replace=True to override)")
    _FACTORIES[name] = factory


def list_pools() -> list[str]:
    """Registered pool names (plus the ``file:PATH`` form, which is not listed)."""
    load_plugins()
    return sorted(_FACTORIES)


def get_pool(name: str, **options) -> TextPool:
    """Build the pool `name` (a registered name or ``file:PATH``) with the factory's options."""
    if not isinstance(name, str):
        raise ConfigError(f"pool name must be a string, got {type(name).__name__}")
    load_plugins()
    if name.startswith("file:"):
        texts = _file_pool(name[len("file:"):], **options)
    elif name in _FACTORIES:
        try:
            texts = _FACTORIES[name](**options)
        except TypeError as err:
            raise ConfigError(f"text pool {name!r}: bad options {sorted(options)}: {err}") from None
    else:
        raise ConfigError(f"unknown text pool {name!r}; known: {', '.join(list_pools())}, file:PATH")
    texts = list(texts)
    bad = next((t for t in texts if not isinstance(t, str) or not t.strip()), None)
    if bad is not None or not texts:
        raise ConfigError(f"text pool {name!r} must be a non-empty list of non-empty strings, got {bad!r}")
    return TextPool(name=name, texts=texts, hash=pool_hash(texts))


def _file_pool(path: str, *, encoding: str = "utf-8") -> list[str]:
    file = pathlib.Path(path).expanduser()
    try:
        lines = file.read_text(encoding=encoding).splitlines()
    except FileNotFoundError:
        raise DataError(f"text pool file not found: {file}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read text pool file {file}: {err}") from None
    texts = [line.rstrip() for line in lines if line.strip()]
    if not texts:
        raise DataError(f"text pool file {file} holds no non-empty lines")
    return texts


def apply_template(words: list[str], template: str | None) -> list[str]:
    if template is None:
        return words
    if not isinstance(template, str) or "{}" not in template:
        raise ConfigError(f"template must be a string with one '{{}}', got {template!r}")
    return [template.format(w) for w in words]


def _wordfreq_en(top_n: int = 1000, wordlist: str = "best") -> list[str]:
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
        raise ConfigError(f"top_n must be an integer ≥ 1, got {top_n!r}")
    import wordfreq

    words = wordfreq.top_n_list("en", top_n, wordlist=wordlist)
    if not words:
        raise DataError(f"wordfreq has no English word list {wordlist!r}")
    return words


def _imagenet(templates: str = "none", template: str | None = None) -> list[str]:
    from clipscope._torchvision_compat import import_open_clip

    metadata = import_open_clip().zero_shot_metadata
    names = list(metadata.IMAGENET_CLASSNAMES)
    if template is not None:
        if templates != "none":
            raise ConfigError("imagenet pool: give either template or templates, not both")
        return apply_template(names, template)
    sets = {"none": None, "simple": metadata.SIMPLE_IMAGENET_TEMPLATES, "openai": metadata.OPENAI_IMAGENET_TEMPLATES}
    if templates not in sets:
        raise ConfigError(f"imagenet pool: templates must be one of {', '.join(sets)}, got {templates!r}")
    chosen = sets[templates]
    if chosen is None:
        return names
    return [fill(name) for name in names for fill in chosen]


register_pool("wordfreq-en", _wordfreq_en)
register_pool("imagenet", _imagenet)
