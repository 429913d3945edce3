"""The demo's applications of the decompositions: the spurious-cue table of the shapes-spurious world
(worst group under head ablation) and one neuron-segmentation overlay, each on a small store of its own.

`run_applications(out, executor, pretrained, colour_heads)` writes under OUT/applications/ and returns the
report's lines and the files it wrote. Called from `demo.run_demo`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from clipscope.cluster.executor import Executor
from clipscope.pipelines.jobs import roles, second_order, segment, textspan, worst_group
from clipscope.pipelines.jobs.extract.job import run_extract
from clipscope.pipelines.jobs.extract.settings import ExtractConfig
from clipscope.pipelines.jobs.segment import neurons as _neuron_methods  # noqa: F401  (registers "neurons")
from clipscope.pipelines.jobs.segment.job import row_maps
from clipscope.pipelines.jobs.worst_group.job import role_heads
from clipscope.pipelines.worlds.shapes.spurious import SPURIOUS_CLASSES, write_spurious_world
from clipscope.pipelines.worlds.shapes.train import SHAPES_MODEL
from clipscope.pipelines.worlds.shapes.world import LABELS, render, write_world
from clipscope.storage.store import RunStore

logger = logging.getLogger(__name__)

SPURIOUS_SEED, SEGMENT_SEED = 4321, 77
NEURON_LAYERS = (1, 2)  # the demo's second-order layer of the 4-layer shapes CLIP and the one before (spec S8)
NEURON_TOP = 200  # neurons per class, the paper's
CONCEPT_M = 8  # OMP sparsity of concept discovery: the shapes pools have 50 texts, so m = 128 would be all of them


def extract_store(data: Path, out: Path, pretrained: str, executor: Executor | None = None, *,
                  rows_per_chunk: int = 64, batch_size: int = 32, progress: str = "auto", **options) -> RunStore:
    """Extract (or resume) the shapes CLIP store of the shards `data` at `out`; `options`: ExtractConfig fields."""
    config = ExtractConfig(data=(str(data),), out=str(out), model=SHAPES_MODEL, pretrained=pretrained,
                           rows_per_chunk=rows_per_chunk, batch_size=batch_size, **options)
    run_extract(config, executor=executor, progress_display=progress)
    return RunStore.open(str(out), "r+")


def spurious_table(out: Path, pretrained: str, executor: Executor | None) -> tuple[list[str], worst_group.Result]:
    """Worst group of the shapes-spurious world: baseline, the heads `clipscope roles` labels `colours` on this
    store (TextSpan of the last two layers over shapes-all) ablated, best of 5 random sets of as many heads —
    the path `tests/pipelines/jobs/test_worst_group_job.py::test_shapes_spurious_gate` gates."""
    data = out / "spurious" / "data"
    if not any(data.glob("*.tar")):
        write_spurious_world(data, 2, 100, SPURIOUS_SEED)
    store = extract_store(data, out / "spurious" / "store", pretrained, executor)
    textspan.run(store, textspan.Settings(layers=(2, 3), pool="shapes-all", basis_size=5), executor)
    roles.run(store, roles.Settings(layers=(2, 3)), executor)
    colour_heads = role_heads(store, "colours")
    settings = worst_group.Settings(task="shapes-spurious", heads_by_role="colours", random_heads=len(colour_heads),
                                    trials=5)
    result = worst_group.run(store, settings, executor)
    numbers = worst_group.report.spurious_summary(result)
    heads = ", ".join(f"L{l}H{h}" for l, h in colour_heads)
    lines = [f"Spurious cue (shapes-spurious: {' vs '.join(repr('a ' + c) for c in SPURIOUS_CLASSES)}, scenes of "
             f"both shapes in both colours, group = colour; store {store.url}):",
             f"  worst group: baseline {numbers['baseline']:.3f} → heads labelled colours ({heads}) ablated "
             f"{numbers['chosen']:.3f}; best of 5 random {settings.random_heads}-head sets "
             f"{numbers['random_best']:.3f} (mean {numbers['random_mean']:.3f})",
             worst_group.report.format_table(result)]
    return lines, result


def plot_overlay(maps, seed: int, keys: list[str], names: list[str], path: Path, title: str) -> None:
    """Image, neuron heat map and its foreground contour against the true mask, one column per image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(maps), figsize=(2.6 * len(maps), 3.0), squeeze=False)
    image = None
    for ax, (row, norm, pred, truth), key, name in zip(axes[0], maps, keys, names):
        picture = render(int(key.rsplit("-", 1)[-1]), seed).image
        ax.imshow(picture)
        image = ax.imshow(norm, cmap="magma", alpha=0.55, vmin=0, vmax=1)
        ax.contour(pred.astype(float), levels=[0.5], colors="cyan", linewidths=1.0)
        ax.contour(truth.astype(float), levels=[0.5], colors="lime", linewidths=1.0, linestyles="dashed")
        ax.set_title(f"row {row}: {name}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="mean activation of the class's neurons (min–max)")
    fig.suptitle(title + "\ncyan: foreground (> 0.5), dashed green: the main object's true mask", fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def neuron_segmentation(out: Path, pretrained: str, executor: Executor | None,
                        n_images: int = 4) -> tuple[list[str], dict[str, float]]:
    """Neuron segmentation over layers NEURON_LAYERS on a small masked store — the class's neurons ranked by
    |⟨r_n, w_c − w̄⟩| (`--centre-classes`), the reference's |⟨r_n, w_c⟩| and the random-neurons baseline —
    and an overlay PNG of a few images (the first)."""
    data = out / "segment" / "data"
    if not any(data.glob("*.tar")):
        write_world(data, 1, 96, SEGMENT_SEED)
    store = extract_store(data, out / "segment" / "store", pretrained, executor, masks="mask.png",
                     activation_layers=NEURON_LAYERS, second_order_layers=NEURON_LAYERS)
    for layer in NEURON_LAYERS:
        second_order.run(store, second_order.Settings(layer, top_k=20), executor)
    common = dict(task="shapes", class_mode="predicted", target="main", layers=NEURON_LAYERS,
                  top_neurons=NEURON_TOP)
    runs = {"neurons-reference": segment.Settings(method="neurons", **common),
            "neurons-random": segment.Settings(method="neurons-random", **common),
            "neurons": segment.Settings(method="neurons", centre_classes=True, **common)}  # last: the stored one
    scores = {name: segment.run(store, settings).miou for name, settings in runs.items()}
    samples = store.read_samples()
    rows = [int(r) for r in samples.column("row").to_numpy()[:n_images]]
    keys = dict(zip(samples.column("row").to_pylist(), samples.column("key").to_pylist()))
    labels = dict(zip(samples.column("row").to_pylist(), samples.column("label").to_pylist()))
    maps = row_maps(store, runs["neurons"], rows)
    path = out / "neuron_segmentation.png"
    plot_overlay(maps, SEGMENT_SEED, [keys[m[0]] for m in maps], [LABELS[labels[m[0]]] for m in maps], path,
                 f"Neuron segmentation, layers {NEURON_LAYERS[0]}–{NEURON_LAYERS[-1]}: the {NEURON_TOP} neurons whose "
                 f"PCs point most along the predicted class's own direction w_c − w̄")
    lines = [f"Neuron segmentation (layers {NEURON_LAYERS[0]}–{NEURON_LAYERS[-1]}, the {NEURON_TOP} neurons of "
             f"largest |⟨r_n, w_c − w̄⟩| per class, predicted class, main object; {int(store.read_valid().sum())} "
             f"scenes): mIoU {scores['neurons']:.3f}, random neurons {scores['neurons-random']:.3f}, the "
             f"reference's |⟨r_n, w_c⟩| {scores['neurons-reference']:.3f}; overlay {path}"]
    return lines, scores


def concept_hits(store: RunStore, seed: int, layer: int, *, m: int = CONCEPT_M, top: int = 3,
                 permutations: int = 5) -> dict[str, float]:
    """Concept discovery on a shapes-world store whose second-order statistics and OMP of `layer` exist: the
    share of images whose main object's colour or shape word is in one of the `top` discovered texts, the same
    share with γ permuted across neurons (each neuron gets another neuron's decomposition: the spec's
    baseline; the mean and the largest over `permutations` seeded permutations), and the mean share of active neurons |𝒩(I)|/N."""
    import dataclasses

    import numpy as np

    from clipscope.pipelines.jobs import concepts
    from clipscope.pipelines.jobs.concepts.job import concept_model
    from clipscope.pipelines.texts.embedding_cache import stored_texts

    model, attrs = concept_model(store, concepts.Settings(layer=layer, m=m, top=top))
    texts = stored_texts(store, attrs["texts_key"])
    from clipscope.pipelines.worlds.shapes.interpret_demo import scenes_of

    valid = store.read_valid()
    rows = np.flatnonzero(valid)
    q = store.read(model.weights)[valid]
    shared = None if model.shared is None else store.read(model.shared)[valid]
    scene_of = {r.row: r.scene for r in scenes_of(store, seed)}
    mains = [scene_of[int(r)].main for r in rows]

    def share(index: np.ndarray) -> float:
        hits = [bool({main.colour, main.shape} & {w for j in picked if j >= 0 for w in texts[j].split()})
                for main, picked in zip(mains, index)]
        return float(np.mean(hits))

    index, _, active = model.concepts(q, shared)
    baseline = []
    for permutation in range(permutations):
        order = np.random.default_rng(permutation).permutation(model.support.shape[0])
        permuted = dataclasses.replace(model, support=model.support[order], coefs=model.coefs[order])
        baseline.append(share(permuted.concepts(q, shared)[0]))
    return {"hits": share(index), "permuted": float(np.mean(baseline)), "permuted_max": float(np.max(baseline)),
            "active": float(active.mean() / model.support.shape[0]), "n": int(len(rows))}


def run_applications(out: Path, executor: Executor | None, pretrained: str) -> tuple[list[str], list[str]]:
    """(report lines, files written) of both applications under OUT/applications/."""
    where = Path(out) / "applications"
    where.mkdir(parents=True, exist_ok=True)
    spurious_lines, _ = spurious_table(where, pretrained, executor)
    segment_lines, _ = neuron_segmentation(where, pretrained, executor)
    return spurious_lines + [""] + segment_lines, [str(where / "neuron_segmentation.png")]
