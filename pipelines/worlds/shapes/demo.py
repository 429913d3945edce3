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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from clipscope.pipelines.jobs.extract.job import run_extract
from clipscope.pipelines.jobs.extract.settings import ExtractConfig
from clipscope.pipelines.jobs import means, textspan
from clipscope.pipelines.jobs.textspan.report import format_textspan
from clipscope.storage import schema
from clipscope.storage.store import RunStore

logger = logging.getLogger(__name__)

PROPERTIES = ("colours", "shapes", "positions", "sizes", "counts")
MULTI_OBJECT_NOTE = (
    "  (the demo's scenes hold 1–3 objects and the label is the main object's colour × shape, so naming another\n"
    "  object of the scene counts as wrong; on single-object scenes the model scores 0.98 — `clipscope shapes "
    "evaluate`)")


@dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/demo"
    shards: int = 4
    per_shard: int = 128
    seed: int = 0
    workers: int | None = 2  # an embedded Ray with 2 CPUs (None with no address: in this process)
    address: str | None = None  # a Ray cluster to run on instead (or RAY_ADDRESS)
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
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), [f"L{l}" for l in layers])
        ax.set_xticks(range(grid.shape[1]), [f"H{h}" for h in range(grid.shape[1])])
    fig.colorbar(image, ax=axes[0].tolist(), label="share of head variance (TextSpan)")
    fig.suptitle("Which heads carry which property of the shapes world", y=1.06)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_token_maps(store: RunStore, loaded, path: Path, n_images: int = 6) -> None:
    """Per-patch direct effects of the last layer's heads along each image's own caption, overlaid on
    the image (one shared, symmetric colour scale with its bar; the whole caption above each image)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipscope.pipelines.texts.encode import encode_texts
    from clipscope.pipelines.worlds.shapes.world import render
    from clipscope.storage.query import read_samples

    samples = read_samples(store).to_pydict()
    valid = store.read_valid()
    rows = [r for r in samples["row"] if valid[r]][:n_images]
    at = [samples["row"].index(r) for r in rows]
    captions = [samples["caption"][i] for i in at]
    keys = [samples["key"][i] for i in at]
    tokens = store.read(schema.DIRECT_TOKENS.path(), np.asarray(rows))[:, -1]  # [image head token embed]
    texts = encode_texts(loaded, captions)
    grid = int(round((tokens.shape[2] - 1) ** 0.5))
    heats = [(tokens[j].sum(0)[1:] @ texts[j]).reshape(grid, grid) for j in range(len(rows))]
    scale = max(float(np.abs(np.stack(heats)).max()), 1e-12)
    token_layer = store.attrs.get("layers", {}).get("tokens", ["last"])[-1]
    fig, axes = plt.subplots(1, len(rows), figsize=(2.4 * len(rows), 3.4), squeeze=False)
    image = None
    for ax, heat, caption, key in zip(axes[0], heats, captions, keys):
        suffix = key.rsplit("-", 1)[-1]
        if suffix.isdigit():
            picture = np.asarray(render(int(suffix), DemoConfig.seed).image)
            ax.imshow(picture)
            extent = (0, picture.shape[1], picture.shape[0], 0)
        else:
            extent = None
        image = ax.imshow(heat, cmap="coolwarm", vmin=-scale, vmax=scale, alpha=0.6, extent=extent,
                          interpolation="nearest")
        ax.set_title(textwrap.fill(caption, 24), fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"sample {key}", fontsize=6)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8,
                 label="direct effect along the caption\n(per patch, summed over the layer's heads)")
    fig.suptitle(f"Layer {token_layer}: where each image's caption is written into the embedding "
                 f"(red: towards the caption, blue: away; image underneath)", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
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
    norms = store.read_result(schema.SECOND_ORDER["norm_mean"].path(layer=layer))
    return [int(i) for i in np.argsort(-norms, kind="stable")[:n]]


def run_demo(config: DemoConfig = DemoConfig()) -> dict:
    from clipscope.cluster.executor import open_executor
    from clipscope.pipelines.jobs import evaluate
    from clipscope.pipelines.jobs import neurons as neuron_job
    from clipscope.pipelines.jobs.neurons import report as neuron_report
    from clipscope.pipelines.jobs.neurons.job import optional_second_order
    from clipscope.pipelines.jobs import second_order
    from clipscope.pipelines.worlds.shapes.train import SHAPES_MODEL
    from clipscope.pipelines.worlds.shapes.world import write_world
    from clipscope.pipelines.texts.pools import get_pool
    from clipscope.pipelines.texts.zero_shot import chance_line, get_task

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
        masks="mask.png", token_sum=True, attention_layers=(n_layers - 1,),  # for segmentation, maps
    )
    layers = list(range(n_layers - config.textspan_layers, n_layers))
    task = get_task("shapes")
    pool = get_pool("shapes-all")
    with open_executor(config.workers, config.address) as executor:
        summary = run_extract(extract, executor=executor)
        store = RunStore.open(extract.out, "r+")
        means.run(store, means.Settings(), executor)
        texts, labels = vocabulary()
        spans = textspan.run(store, textspan.Settings(layers=tuple(layers), texts=tuple(texts),
                                                      pool="shapes-vocabulary", basis_size=config.basis_size,
                                                      span_rank=32), executor, loaded=loaded)
        table = spans.table()
        ablations = evaluate.run(store, evaluate.Settings(task.name, keep_last=(config.textspan_layers,)), executor,
                                 loaded=loaded)
        neurons = second_order.run(store, second_order.Settings(neuron_layer, top_k=config.neuron_top_k,
                                                                task=task.name), executor)
        neuron_settings = neuron_job.Settings(layer=neuron_layer, texts=tuple(pool.texts), pool_name=pool.name,
                                              m=(1, 2, 4, 8), task=task.name)
        neuron_omp = neuron_job.run(store, neuron_settings, executor, loaded=loaded)
        # the spurious-cue table and a neuron-segmentation overlay, on small stores of their own
        from clipscope.pipelines.worlds.shapes.applications import run_applications

        application_lines, _ = run_applications(out, executor, pretrained)
        # Rosetta Neurons over the shapes zoo (oracle × shapes CLIP × shapes CNN), stores of its own
        from clipscope.pipelines.worlds.shapes.rosetta_zoo import demo_step

        rosetta_lines = demo_step(store.url, str(data_dir), out, executor)
        # CLIP-InterpreT: head roles (heat map), topic and contrastive overlays, the segmentation table
        from clipscope.pipelines.worlds.shapes.interpret_demo import demo_section

        interpret_lines = demo_section(store, loaded, out, seed=config.seed, executor=executor)
    shown = _top_neurons(store, neuron_layer, config.neurons_shown)
    neuron_table = neuron_report.neuron_table(
        neuron_omp, pool, m=config.neuron_texts, top=config.neuron_texts, neurons=shown,
        pc_explained=optional_second_order(store, neuron_layer, "pc_explained"))
    pacsv.write_csv(table, out / "textspan.csv")
    pacsv.write_csv(ablations.table(), out / "ablations.csv")
    pacsv.write_csv(neuron_table, out / "neurons.csv")
    roles = head_roles(table, dict(zip(texts, labels)), layers, loaded.spec.n_heads)
    plot_roles(roles, layers, out / "head_roles.png")
    evaluate.report.plot_evaluation(ablations, out / "ablations.png", chance=1 / len(task.classnames),
                                    title=f"shapes world ({task.name}, {len(task.classnames)} classes): zero-shot "
                                          f"accuracy under mean-ablation")
    plot_token_maps(store, loaded, out / "token_maps.png")
    chance = chance_line(store, task)
    report = [f"clipscope demo — store {store.url}: {summary.images} images "
              f"({summary.done} shards extracted now, {summary.skipped} already done), model {SHAPES_MODEL} "
              f"({'trained checkpoint' if pretrained != 'none' else 'RANDOM INIT: no checkpoint found'})", "",
              "Heads by property (share of head variance explained by that property's texts, TextSpan):"]
    props = list(PROPERTIES) + ["other"]
    for p, prop in enumerate(props[:-1]):
        best = np.dstack(np.unravel_index(np.argsort(-roles[p], axis=None)[:3], roles[p].shape))[0]
        shown_heads = ", ".join(f"L{layers[i]}H{h} {roles[p, i, h]:.0%}" for i, h in best)
        report.append(f"  {prop:9s} {shown_heads}")
    report += ["", "TextSpan, last layers (first picks per head):", format_textspan(spans, per_head=4), "",
               f"Zero-shot accuracy ({task.name}, {len(task.classnames)} classes) under mean-ablation:",
               evaluate.report.format_evaluation(ablations), chance, MULTI_OBJECT_NOTE, "",
               f"Neurons of layer {neuron_layer}: second-order effects (top {config.neuron_top_k} images per neuron)",
               second_order.report.format_summary(neurons),
               second_order.report.format_evaluation(neurons), chance, "",
               f"Neurons with the largest second-order effects, as {config.neuron_texts} texts each (OMP of their PC):",
               neuron_report.format_neurons(neuron_table, shown, config.neuron_texts),
               neuron_report.format_accuracy(neuron_omp.accuracy), chance, "",
               "files: " + ", ".join(str(out / f) for f in ("report.txt", "textspan.csv", "head_roles.png",
                                                              "ablations.csv", "ablations.png", "neurons.csv",
                                                              "token_maps.png")),
               f"explore: clipscope status {store.url}; clipscope query {store.url} text --layer {layers[-1]} "
               f"--head 0 --text 'a red circle'; clipscope neurons {store.url} --layer {neuron_layer} "
               f"--pool shapes-all --m 4"]
    report[-2:-2] = ["Applications of the decompositions:", *application_lines, ""]  # before "files:"
    report[-2:-2] = [*rosetta_lines, ""]  # Rosetta Neurons, before "files:"
    report[-2:-2] = [*interpret_lines, ""]  # CLIP-InterpreT, before "files:"
    text = "\n".join(report)
    (out / "report.txt").write_text(text + "\n")
    print(text)
    return {"summary": summary, "roles": roles, "table": table, "ablations": ablations,
            "neuron_ablations": neurons, "neurons": neuron_table}
