"""Zero-shot classification tasks over a store: class names × prompt templates → a classifier.

A task names its classes, its prompt templates and how a sample's stored label (the `label` column
of `samples.parquet`) maps to a class. The classifier follows open_clip's convention: per class the
mean of the unit text embeddings of its prompts, normalised again. Text embeddings are computed with
the run's model and cached in the store (`texts.embedding_cache.cached_text_embeddings`), so evaluations and
reductions ask the model once per task and store.

Built in (the shapes world adds shapes, shapes-colour, shapes-shape and shapes-spurious through its plugin):
  imagenet       open_clip's ImageNet class names × its 80 OpenAI templates (label = class index)
  imagenet-simple the same names × open_clip's 7 simple templates
  waterbirds     landbird, waterbird × the 80 OpenAI templates (label = y)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from clipscope.errors import ConfigError, ParameterError, StoreError
from clipscope.kernels.zero_shot import class_weights, count_correct
from clipscope.pipelines.models.loading import LoadedModel
from clipscope.pipelines.texts.plugins import load_plugins
from clipscope.storage.store import RunStore


@dataclass(frozen=True)
class ZeroShotTask:
    name: str
    classnames: tuple[str, ...]
    templates: tuple[Callable[[str], str], ...]
    # stored label (≥ 0) → class index; None: the label is the class index
    label_to_class: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def prompts(self) -> list[str]:
        """Class-major: the prompts of class 0, then of class 1, …"""
        return [fill(name) for name in self.classnames for fill in self.templates]

    def classes_of(self, labels: np.ndarray) -> np.ndarray:
        """Stored labels [sample] → class indices [sample], −1 where a sample has no label."""
        labels = np.asarray(labels, np.int64)
        out = np.full(labels.shape, -1, np.int64)
        known = labels >= 0
        mapped = labels[known] if self.label_to_class is None else self.label_to_class(labels[known])
        out[known] = mapped
        bad = out >= len(self.classnames)
        if bad.any():
            raise StoreError(f"zero-shot task {self.name!r}: stored label {int(labels[bad][0])} maps to no class "
                             f"(it has {len(self.classnames)})")
        return out


_TASKS: dict[str, Callable[[], ZeroShotTask]] = {}


def register_task(name: str, factory: Callable[[], ZeroShotTask], *, replace: bool = False) -> None:
    if name in _TASKS and not replace:
        raise ConfigError(f"zero-shot task {name!r} is already registered (pass replace=True to override)")
    _TASKS[name] = factory


def list_tasks() -> list[str]:
    load_plugins()
    return sorted(_TASKS)


def get_task(name: str) -> ZeroShotTask:
    load_plugins()
    if name not in _TASKS:
        raise ConfigError(f"unknown zero-shot task {name!r}; known: {', '.join(list_tasks())}")
    return _TASKS[name]()


def classifier(store: RunStore, task: ZeroShotTask, loaded: LoadedModel | None = None) -> np.ndarray:
    """[embed class] unit zero-shot weights of `task` with the store's model (cached in the store)."""
    from clipscope.pipelines.texts.embedding_cache import cached_text_embeddings

    prompts = task.prompts
    emb = cached_text_embeddings(store, prompts, pool_name=f"zero-shot:{task.name}", loaded=loaded)
    prompts_by_class = torch.from_numpy(emb.astype(np.float64)).reshape(len(task.classnames), len(task.templates), -1)
    return class_weights(prompts_by_class).numpy().astype(np.float32)


def store_classes(store: RunStore, task: ZeroShotTask) -> np.ndarray:
    """[sample] class index of every row under `task`; −1 for rows without a label or not valid."""
    samples = store.read_samples()
    if samples is None or samples.num_rows == 0:
        raise StoreError(f"{store.url} has no samples.parquet; finish the extraction first")
    rows = samples.column("row").to_numpy()
    labels = np.full(store.n_rows, -1, np.int64)
    labels[rows] = samples.column("label").to_numpy()
    classes = task.classes_of(labels)
    classes[~store.read_valid()] = -1
    return classes


def accuracy(embeddings: np.ndarray, weights: np.ndarray, classes: np.ndarray) -> float:
    """Top-1 accuracy of `embeddings` [sample embed] under `weights` [embed class] over labelled rows.

    The embeddings need not be normalised: the arg-max of cosine similarity does not depend on the
    image's norm.
    """
    labelled = int((classes >= 0).sum())
    if not labelled:
        raise ConfigError("no labelled samples to score; the zero-shot task needs the samples' labels")
    hits = count_correct(torch.from_numpy(np.asarray(embeddings, np.float64)),
                         torch.from_numpy(np.asarray(weights, np.float64)), torch.from_numpy(np.asarray(classes)))
    return int(hits) / labelled


def _imagenet_task(templates: str) -> Callable[[], ZeroShotTask]:
    def factory() -> ZeroShotTask:
        from clipscope._torchvision_compat import import_open_clip

        meta = import_open_clip().zero_shot_metadata
        chosen = meta.OPENAI_IMAGENET_TEMPLATES if templates == "openai" else meta.SIMPLE_IMAGENET_TEMPLATES
        name = "imagenet" if templates == "openai" else "imagenet-simple"
        return ZeroShotTask(name, tuple(meta.IMAGENET_CLASSNAMES), tuple(chosen))

    return factory


register_task("imagenet", _imagenet_task("openai"))
register_task("imagenet-simple", _imagenet_task("simple"))


def _waterbirds_task() -> ZeroShotTask:
    """Waterbirds (`clipscope convert waterbirds`): the reference's classes × the 80 OpenAI templates;
    the stored label is y (0 = landbird, 1 = waterbird)."""
    from clipscope._torchvision_compat import import_open_clip

    templates = import_open_clip().zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES
    return ZeroShotTask("waterbirds", ("landbird", "waterbird"), tuple(templates))


register_task("waterbirds", _waterbirds_task)


def default_task(store: RunStore) -> str:
    """`shapes` for a store of the shapes-world model, else `imagenet`."""
    name = (store.attrs.get("model") or {}).get("name", "")
    return "shapes" if name == "clipscope-shapes" else "imagenet"


def tasks_arg(value: str | Sequence[str]) -> list[ZeroShotTask]:
    names = [v for v in (value.split(",") if isinstance(value, str) else value) if v]
    if not names:
        raise ParameterError("task", "must name at least one zero-shot task")
    return [get_task(n) for n in names]


def labelled_count(store: RunStore, task: ZeroShotTask) -> int:
    """How many valid rows of `store` have a class under `task` (0 for a store of unlabelled images:
    webdataset samples without a `.cls` entry). Reads only `samples.parquet` and `valid`."""
    return int((store_classes(store, task) >= 0).sum())


def chance_levels(classes: np.ndarray, n_classes: int) -> tuple[float, float]:
    """(1 / n_classes, the majority class's share of the labelled rows): the accuracy of a uniform
    random guess and of always answering the most frequent class. Every accuracy clipscope prints
    is shown beside these two."""
    labelled = np.asarray(classes)[np.asarray(classes) >= 0]
    majority = float(np.bincount(labelled).max() / labelled.size) if labelled.size else float("nan")
    return 1.0 / n_classes, majority


def format_chance(classes: np.ndarray, n_classes: int) -> str:
    """'chance 0.018 (1/56), majority class 0.054' — the text printed beside accuracies."""
    uniform, majority = chance_levels(classes, n_classes)
    return f"chance {uniform:.3f} (1/{n_classes}), majority class {majority:.3f}"


def chance_line(store: RunStore, task: ZeroShotTask) -> str:
    """'  chance (shapes, 56 classes, 512 labelled images): 0.018 (1/56), majority class 0.054' for the
    valid labelled rows of `store`."""
    classes = store_classes(store, task)
    return (f"  chance ({task.name}, {len(task.classnames)} classes, {int((classes >= 0).sum())} labelled images): "
            f"{format_chance(classes, len(task.classnames)).removeprefix('chance ')}")
