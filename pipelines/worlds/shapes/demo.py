"""`clipscope demo`: the shapes world end to end, on an embedded Ray.

Generates the shapes world, extracts it with the shipped shapes-world CLIP (two CPU actors),
computes dataset means and TextSpan for every head of the last layers over the world's vocabulary,
mean-ablation accuracies, and the second-order PCs of one neuron layer with their OMP text
decompositions, and writes a report: which heads carry colour, shape, position, size or count
(table + heatmap PNG), each head's first TextSpan texts (CSV), the ablation table and curve
(CSV + PNG), the neurons with the largest effects as signed texts (CSV), and per-token heatmaps of
a few images (PNG).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from clipscope.pipelines.jobs.extract.job import run_extract
from clipscope.pipelines.jobs.extract.settings import ExtractConfig
from clipscope.pipelines.jobs.means.job import dataset_means
from clipscope.pipelines.jobs.textspan.job import TextSpanSettings, format_textspan, run_textspan
from clipscope.storage.store import RunStore

logger = logging.getLogger(__name__)

PROPERTIES = ("colours", "shapes", "positions", "sizes", "counts")


@dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/demo"
    shards: int = 4
    per_shard: int = 128
    seed: int = 0
    workers: int = 2
    textspan_layers: int = 2  # the last N layers
    basis_size: int = 8
    neuron_top_k: int = 20  # images per neuron for its PC (the paper: 100 of ~5000)
    neurons_shown: int = 8
    neuron_texts: int = 4


def vocabulary() -> tuple[list[str], list[str]]:
    """The world's texts and, for each, the property it names (or 'other' for distractors)."""
    from clipscope.pipelines.texts.pools import get_pool

    texts, labels = [], []
    for prop in PROPERTIES:
        for text in get_pool(f"shapes-{prop}").texts:
            if text not in texts:
                texts.append(text)
                labels.append(prop)
    for text in get_pool("shapes-all").texts:
        if text not in texts:
            texts.append(text)
            labels.append("other")
    return texts, labels


def head_roles(table: pa.Table, labels_of: dict[str, str], layers: list[int], n_heads: int) -> np.ndarray:
    """[property, layer, head]: the share of a head's variance explained by texts of each property."""
    roles = np.zeros((len(PROPERTIES) + 1, len(layers), n_heads))
    props = list(PROPERTIES) + ["other"]
    data = table.to_pydict()
    for layer, head, text, ratio in zip(data["layer"], data["head"], data["text"], data["explained_ratio"]):
        roles[props.index(labels_of[text]), layers.index(layer), head] += ratio
    return roles


def plot_roles(roles: np.ndarray, layers: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    props = list(PROPERTIES) + ["other"]
    fig, axes = plt.subplots(1, len(props), figsize=(3 * len(props), 0.6 * len(layers) + 1.6), squeeze=False)
    for ax, prop, grid in zip(axes[0], props, roles):
        image = ax.imshow(grid, vmin=0, vmax=max(roles.max(), 1e-9), cmap="viridis", aspect="auto")
        ax.set_title(prop)
        ax.set_yticks(range(len(layers)), [f"L{l}" for l in layers])
        ax.set_xticks(range(grid.shape[1]), [f"H{h}" for h in range(grid.shape[1])])
    fig.colorbar(image, ax=axes[0].tolist(), label="share of head variance (TextSpan)")
    fig.suptitle("Which heads carry which property of the shapes world", y=1.06)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_token_maps(store: RunStore, loaded, path: Path, n_images: int = 6) -> None:
    """Per-token direct effects of the last layer's heads along each image's own caption text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipscope.pipelines.texts.encode import encode_texts
    from clipscope.storage.query import read_samples

    samples = read_samples(store).to_pydict()
    valid = store.read_valid()
    rows = [r for r in samples["row"] if valid[r]][:n_images]
    captions = [samples["caption"][samples["row"].index(r)] for r in rows]
    tokens = store.read("direct/tokens", np.asarray(rows))[:, -1]  # [image head token embed]
    texts = encode_texts(loaded, captions)
    grid = int(round((tokens.shape[2] - 1) ** 0.5))
    fig, axes = plt.subplots(2, len(rows), figsize=(2.2 * len(rows), 4.6), squeeze=False)
    from clipscope.pipelines.worlds.shapes.world import render

    keys = [samples["key"][samples["row"].index(r)] for r in rows]
    for j, (row, caption, key) in enumerate(zip(rows, captions, keys)):
        index = int(key.rsplit("-", 1)[-1]) if key.rsplit("-", 1)[-1].isdigit() else None
        if index is not None:
            axes[0, j].imshow(render(index, DemoConfig.seed).image)
        axes[0, j].set_title(caption[:28], fontsize=7)
        heat = (tokens[j].sum(0)[1:] @ texts[j]).reshape(grid, grid)
        axes[1, j].imshow(heat, cmap="magma")
        for ax in axes[:, j]:
            ax.axis("off")
    fig.suptitle("last layer: per-patch direct effect along the caption")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def demo_model():
    """(LoadedModel, pretrained argument): the shipped shapes-world CLIP, else a seeded random init."""
    from clipscope.pipelines.models.loading import load_model
    from clipscope.pipelines.worlds.shapes.train import CHECKPOINT, SHAPES_MODEL, load_shapes_model

    if CHECKPOINT.is_file():
        return load_shapes_model(), str(CHECKPOINT)
    logger.warning("no trained shapes-world checkpoint at %s: using a random-init %s, so the report shows the "
                   "machinery, not learned roles (train one: python -m clipscope.pipelines.worlds.shapes.train)",
                   CHECKPOINT, SHAPES_MODEL)
    return load_model(SHAPES_MODEL, "none"), "none"


def _top_neurons(store: RunStore, layer: int, n: int) -> list[int]:
    norms = store.read_result(f"reductions/second_order/layer_{layer}/norm_mean")
    return [int(i) for i in np.argsort(-norms, kind="stable")[:n]]


def run_demo(config: DemoConfig = DemoConfig()) -> dict:
    from clipscope.cluster.runtime import ray_runtime
    from clipscope.pipelines.jobs.evaluate import job as evaluate
    from clipscope.pipelines.jobs.neurons import job as omp_job
    from clipscope.pipelines.jobs.second_order import ablation as second_order_eval
    from clipscope.pipelines.jobs.second_order import job as second_order_job
    from clipscope.pipelines.worlds.shapes.train import SHAPES_MODEL
    from clipscope.pipelines.worlds.shapes.world import write_world
    from clipscope.pipelines.texts.pools import get_pool
    from clipscope.pipelines.texts.zero_shot import get_task

    out = Path(config.out)
    data_dir = out / "data"
    if not data_dir.is_dir() or not any(data_dir.glob("*.tar")):
        logger.info("generating the shapes world: %d shards × %d images", config.shards, config.per_shard)
        write_world(data_dir, config.shards, config.per_shard, config.seed)
    loaded, pretrained = demo_model()
    n_layers = loaded.spec.n_layers
    neuron_layer = n_layers - 2
    extract = ExtractConfig(
        data=(str(data_dir),), out=str(out / "store"), model=SHAPES_MODEL, pretrained=pretrained,
        token_layers=(n_layers - 1,), second_order_layers=(neuron_layer,), workers=config.workers,
        rows_per_chunk=64, batch_size=32,
    )
    layers = list(range(n_layers - config.textspan_layers, n_layers))
    task = get_task("shapes")
    pool = get_pool("shapes-all")
    with ray_runtime(num_cpus=max(2, os.cpu_count() or 2)):
        summary = run_extract(extract)
        store = RunStore.open(extract.out, "r+")
        dataset_means(store, use_ray=True)
        texts, labels = vocabulary()
        table = run_textspan(store, layers, texts, settings=TextSpanSettings(basis_size=config.basis_size, span_rank=32),
                             pool_name="shapes-vocabulary", use_ray=True, loaded=loaded)
        ablations = evaluate.evaluate_ablations(store, task, keep_last=(config.textspan_layers,), use_ray=True,
                                                loaded=loaded)
        settings = second_order_job.SecondOrderSettings(top_k=config.neuron_top_k)
        neurons = second_order_job.run_second_order(store, neuron_layer, settings=settings, use_ray=True)
        neuron_ablations = second_order_eval.run_evaluation(store, neuron_layer, task, settings=settings, use_ray=True)
        omp_job.run_omp(store, neuron_layer, pool, m=(1, 2, 4, 8), use_ray=True, loaded=loaded)
        omp_accuracy = omp_job.reconstruction_accuracy(store, neuron_layer, task=task.name, use_ray=True,
                                                       loaded=loaded)
    shown = _top_neurons(store, neuron_layer, config.neurons_shown)
    neuron_table = omp_job.neuron_table(store, neuron_layer, pool, m=config.neuron_texts, top=config.neuron_texts,
                                        neurons=shown)
    pacsv.write_csv(table, out / "textspan.csv")
    pacsv.write_csv(ablations, out / "ablations.csv")
    pacsv.write_csv(neuron_table, out / "neurons.csv")
    roles = head_roles(table, dict(zip(texts, labels)), layers, loaded.spec.n_heads)
    plot_roles(roles, layers, out / "head_roles.png")
    evaluate.plot_evaluation(ablations, out / "ablations.png", title="shapes: accumulated mean-ablation of heads")
    plot_token_maps(store, loaded, out / "token_maps.png")
    report = [f"clipscope demo — store {store.url}: {summary.images} images "
              f"({summary.done} shards extracted now, {summary.skipped} already done), model {SHAPES_MODEL} "
              f"({'trained checkpoint' if pretrained != 'none' else 'RANDOM INIT: no checkpoint found'})", "",
              "Heads by property (share of head variance explained by that property's texts, TextSpan):"]
    props = list(PROPERTIES) + ["other"]
    for p, prop in enumerate(props[:-1]):
        best = np.dstack(np.unravel_index(np.argsort(-roles[p], axis=None)[:3], roles[p].shape))[0]
        shown_heads = ", ".join(f"L{layers[i]}H{h} {roles[p, i, h]:.0%}" for i, h in best)
        report.append(f"  {prop:9s} {shown_heads}")
    report += ["", "TextSpan, last layers (first picks per head):", format_textspan(table, per_head=4), "",
               f"Zero-shot accuracy ({task.name}, {len(task.classnames)} classes) under mean-ablation:",
               evaluate.format_evaluation(ablations), "",
               f"Neurons of layer {neuron_layer}: second-order effects (top {config.neuron_top_k} images per neuron)",
               second_order_job.format_summary(neurons),
               second_order_eval.format_evaluation(neuron_ablations, task.name), "",
               f"Neurons with the largest second-order effects, as {config.neuron_texts} texts each (OMP of their PC):",
               omp_job.format_neurons(neuron_table, shown, config.neuron_texts),
               omp_job.format_accuracy(omp_accuracy), "",
               "files: " + ", ".join(str(out / f) for f in ("report.txt", "textspan.csv", "head_roles.png",
                                                              "ablations.csv", "ablations.png", "neurons.csv",
                                                              "token_maps.png")),
               f"explore: clipscope status {store.url}; clipscope query {store.url} text --layer {layers[-1]} "
               f"--head 0 --text 'a red circle'; clipscope neurons {store.url} --layer {neuron_layer} "
               f"--pool shapes-all --m 4"]
    text = "\n".join(report)
    (out / "report.txt").write_text(text + "\n")
    print(text)
    return {"summary": summary, "roles": roles, "table": table, "ablations": ablations,
            "neuron_ablations": neuron_ablations, "neurons": neuron_table}
