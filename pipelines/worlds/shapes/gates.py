"""Every meaning gate of the CLIP-InterpreT analyses, Rosetta and the applications, measured on one shapes CLIP
checkpoint and printed against its threshold: the gates that hold for the shipped model are frozen as tests
(`tests/pipelines/worlds/test_{interpret,concept}_gate*.py`, `test_rosetta_zoo.py`, `test_worst_group_job.py`);
this prints them all, the failing ones included, for the shipped model or any retrained one.

``python -m clipscope.pipelines.worlds.shapes.gates [--checkpoint F] [--work DIR] [--json F]``

Thresholds are the tests' frozen ones where a gate holds on the shipped model; where it never held, the spec's
wording made a number (named in `GATES`: a shape head "the reverse" of a colour head uses the colour head's
thresholds mirrored). Neuron segmentation ranks neurons by the class-specific direction w_c − w̄ (see
`applications.neuron_segmentation`); the reference's ranking is shown beside it. The heads are the ones the spec
names from the shipped model's demo: colour heads L3H3, L3H2, shape heads L2H2, L3H0.

Stores (under `--work`, reused when present): 256 scenes of 1–3 objects (world seed 0), 200 single-object
scenes (seed 2), 300 scenes for the Rosetta pair (seed 5) and the applications' own (see `applications`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from clipscope.pipelines.worlds.shapes import world

COLOUR_HEADS = ((3, 3), (3, 2))
SHAPE_HEADS = ((2, 2), (3, 0))
TEXT_HEAD = TOPIC_HEAD = (3, 2)
ROLE_LAYERS = (0, 1, 2, 3)


@dataclass(frozen=True)
class Gate:
    issue: str
    name: str
    threshold: str
    holds: Callable[[dict], bool]
    shown: Callable[[dict], str]


def _nn(m: dict, head: tuple[int, int]) -> dict:
    return m["nn"][f"L{head[0]}H{head[1]}"]


def _head(head: tuple[int, int]) -> str:
    return f"L{head[0]}H{head[1]}"


GATES: tuple[Gate, ...] = (
    *(Gate("S5", f"colour head {_head(h)}: neighbours share the colour, not the shape", "colour ≥ 0.33, shape ≤ 0.22",
           lambda m, h=h: _nn(m, h)["colour"] >= 0.33 and _nn(m, h)["shape"] <= 0.22,
           lambda m, h=h: f"colour {_nn(m, h)['colour']:.3f}, shape {_nn(m, h)['shape']:.3f}") for h in COLOUR_HEADS),
    *(Gate("S5", f"shape head {_head(h)}: neighbours share the shape, not the colour", "shape ≥ 0.33, colour ≤ 0.22",
           lambda m, h=h: _nn(m, h)["shape"] >= 0.33 and _nn(m, h)["colour"] <= 0.22,
           lambda m, h=h: f"shape {_nn(m, h)['shape']:.3f}, colour {_nn(m, h)['colour']:.3f}") for h in SHAPE_HEADS),
    Gate("S5", "property neighbours over the heads labelled colours", "colour ≥ 0.85",
         lambda m: m["nn_colours"]["colour"] >= 0.85, lambda m: f"colour {m['nn_colours']['colour']:.3f}"),
    Gate("S5", f"text 'red' on {_head(TEXT_HEAD)} retrieves red objects", "precision@8 ≥ 0.875",
         lambda m: m["text_red"] >= 0.875, lambda m: f"{m['text_red']:.3f}"),
    Gate("S5", f"topic map of 'a red shape' on {_head(TOPIC_HEAD)} locates the red object", "mIoU ≥ 0.5 and > raw attention",
         lambda m: m["topic"]["topic"] >= 0.5 and m["topic"]["topic"] > m["topic"]["attention"],
         lambda m: f"{m['topic']['topic']:.3f} vs attention {m['topic']['attention']:.3f} ({m['topic']['n']} scenes)"),
    Gate("S5", "contrast 'red' − 'blue' (all heads) has the right sign on object pixels", "≥ 0.85",
         lambda m: m["contrast"]["correct"] >= 0.85, lambda m: f"{m['contrast']['correct']:.3f} ({m['contrast']['n']} scenes)"),
    Gate("S6", "roles: L3H3, L3H2 colours; L2H2, L3H0 shapes", "all four",
         lambda m: m["roles"] == ["colours", "colours", "shapes", "shapes"], lambda m: ", ".join(m["roles"])),
    Gate("S6", "association: trained vs random init", "≥ 0.5, random ≤ 0.125",
         lambda m: m["association"][0] >= 0.5 and m["association"][1] <= 0.125,
         lambda m: f"{m['association'][0]:.3f} vs {m['association'][1]:.3f}"),
    Gate("S7", "token segmentation of the main object (single-object scenes)", "mIoU ≥ 0.53 and ≥ random + 0.20",
         lambda m: m["segment"]["tokens"] >= 0.53 and m["segment"]["tokens"] >= m["segment"]["random"] + 0.2,
         lambda m: f"tokens {m['segment']['tokens']:.3f}, random {m['segment']['random']:.3f}"),
    Gate("S3 R1", "oracle colour units with a CLIP best buddy r ≥ 0.4: trained vs random init", "≥ 6/8 vs ≤ 2/8, best r 0.1 apart",
         lambda m: m["r1"]["trained"][0] >= 6 and m["r1"]["random"][0] <= 2 and m["r1"]["random"][1] < m["r1"]["trained"][1] - 0.1,
         lambda m: f"{m['r1']['trained'][0]}/8 (best r {m['r1']['trained'][1]:.2f}) vs {m['r1']['random'][0]}/8 "
                   f"({m['r1']['random'][1]:.2f})"),
    Gate("S8", "neuron segmentation (layers 1–2, 200 neurons by |⟨r_n, w_c − w̄⟩|) beats random neurons",
         "by ≥ 0.03 mIoU",
         lambda m: m["neurons"]["neurons"] >= m["neurons"]["neurons-random"] + 0.03,
         lambda m: f"{m['neurons']['neurons']:.3f} vs random {m['neurons']['neurons-random']:.3f} (the reference's "
                   f"|⟨r_n, w_c⟩|: {m['neurons']['neurons-reference']:.3f})"),
    *(Gate("S9", f"concept discovery, layer {layer}: main colour or shape in the top 3 (m = 8)",
           "≥ 0.45 and ≥ largest of 5 permutations + 0.1",
           lambda m, layer=layer: m["concepts"][layer]["hits"] >= max(0.45, m["concepts"][layer]["permuted_max"] + 0.1),
           lambda m, layer=layer: f"{m['concepts'][layer]['hits']:.3f} vs permuted {m['concepts'][layer]['permuted']:.3f} "
                                  f"(largest {m['concepts'][layer]['permuted_max']:.3f})") for layer in (1, 2)),
    Gate("S11", "shapes-spurious worst group: the colour heads ablated", "baseline ≤ 0.10, +0.5, ≥ best random + 0.2",
         lambda m: (m["spurious"]["baseline"] <= 0.10 and m["spurious"]["chosen"] >= m["spurious"]["baseline"] + 0.5
                    and m["spurious"]["chosen"] >= m["spurious"]["random_best"] + 0.2),
         lambda m: f"{m['spurious']['baseline']:.2f} → {m['spurious']['chosen']:.2f}, best random "
                   f"{m['spurious']['random_best']:.2f}"),
)


def _world(where: Path, n_shards: int, per_shard: int, seed: int, **options) -> Path:
    if not any(where.glob("*.tar")):
        world.write_world(where, n_shards, per_shard, seed, **options)
    return where


def textspan_roles(store, loaded):
    """TextSpan of every layer over the world's vocabulary (8 texts per head), then `clipscope roles`."""
    from clipscope.pipelines.jobs import roles, textspan
    from clipscope.pipelines.worlds.shapes.demo import vocabulary

    texts, _ = vocabulary()
    textspan.run(store, textspan.Settings(layers=ROLE_LAYERS, texts=tuple(texts), pool="shapes-vocabulary",
                                          basis_size=8, span_rank=32), loaded=loaded)
    return roles.run(store, roles.Settings())


def measure(checkpoint: str, work: Path, log: Callable[[str], None] = print) -> dict:
    """Every number `GATES` reads, for the checkpoint, with the stores made (or reused) under `work`."""
    from clipscope.pipelines.jobs import neurons, second_order, segment, worst_group
    from clipscope.pipelines.models.loading import load_model
    from clipscope.pipelines.texts.pools import get_pool
    from clipscope.pipelines.worlds.shapes import interpret_demo as demo
    from clipscope.pipelines.worlds.shapes import rosetta_zoo
    from clipscope.pipelines.worlds.shapes.applications import (concept_hits, extract_store, neuron_segmentation,
                                                                spurious_table)
    from clipscope.pipelines.worlds.shapes.train import SHAPES_MODEL, load_shapes_model

    def _extract(data: Path, out: Path, pretrained: str, **options):
        return extract_store(data, out, pretrained, batch_size=64, progress="off", **options)

    work.mkdir(parents=True, exist_ok=True)
    loaded = load_shapes_model(path=checkpoint)
    layers = tuple(range(loaded.spec.n_layers))
    log("extracting the mixed, single-object and random-init stores")
    mixed = _extract(_world(work / "mixed-data", 2, 128, 0), work / "mixed.zarr", checkpoint, token_layers=layers,
                     token_sum=True, attention_layers=layers, masks="mask.png", second_order_layers=(1, 2),
                     activation_layers=(1, 2))
    single = _extract(_world(work / "single-data", 2, 100, 2, counts=(1,)), work / "single.zarr", checkpoint,
                      token_sum=True, attention_layers=(layers[-1],), masks="mask.png")
    noise = _extract(work / "mixed-data", work / "random.zarr", "none")
    mixed_rows, single_rows = demo.scenes_of(mixed, 0), demo.scenes_of(single, 2, world.WorldConfig(counts=(1,)))
    log("TextSpan and roles")
    role = textspan_roles(mixed, loaded)
    out: dict = {"checkpoint": checkpoint}
    out["nn"] = {_head(h): demo.neighbour_agreement(single, single_rows, [h]) for h in COLOUR_HEADS + SHAPE_HEADS}
    out["nn_colours"] = demo.neighbour_agreement(single, single_rows, role.heads_with("colours"))
    out["text_red"] = demo.text_precision(single, single_rows, TEXT_HEAD, "red", loaded=loaded)
    out["topic"] = demo.topic_localisation(mixed, mixed_rows, TOPIC_HEAD, loaded=loaded)
    out["contrast"] = demo.contrast_sign(mixed, mixed_rows, head=None, loaded=loaded)
    out["roles"] = [role.label_of(*h) for h in COLOUR_HEADS + SHAPE_HEADS]
    out["association"] = (role.association, textspan_roles(noise, load_model(SHAPES_MODEL, "none")).association)
    out["segment"] = {m: segment.run(single, segment.Settings(method=m, task="shapes", target="main"),
                                     loaded=loaded).miou for m in ("tokens", "random")}
    log("Rosetta R1")
    zoo_data = _world(work / "zoo-data", 3, 100, 5)
    clips = {name: _extract(zoo_data, work / f"zoo-{name}.zarr", pretrained, activation_layers=layers,
                            rows_per_chunk=50, seed=seed).url  # seed 1: the zoo's random control
             for name, pretrained, seed in (("trained", checkpoint, 0), ("random", "none", 1))}
    zoo = rosetta_zoo.build_zoo(str(zoo_data), work / "zoo", rows_per_chunk=50, controls=False,
                                clip_store=clips["trained"])
    out["r1"] = {}
    for name, url in clips.items():
        result = rosetta_zoo.run_pair(zoo.oracle, url, f"gates-{name}", rosetta_zoo.colour_layers())
        out["r1"][name] = (rosetta_zoo.colour_buddies(result, 0.4)[0], rosetta_zoo.colour_buddies(result, 0.0)[1])
    log("applications")
    out["neurons"] = neuron_segmentation(work / "applications", checkpoint, None)[1]
    pool = get_pool("shapes-all")
    out["concepts"] = {}
    for layer in (1, 2):
        second_order.run(mixed, second_order.Settings(layer, top_k=20))
        neurons.run(mixed, neurons.Settings(layer=layer, texts=tuple(pool.texts), pool_name=pool.name, m=(8,),
                                            accuracy=False))
        out["concepts"][layer] = concept_hits(mixed, 0, layer, m=8)
    out["spurious"] = worst_group.report.spurious_summary(spurious_table(work / "applications", checkpoint, None)[1])
    return out


def report(measured: dict, gates: Sequence[Gate] = GATES) -> str:
    rows = [(g.issue, g.name, g.shown(measured), g.threshold, "holds" if g.holds(measured) else "FAILS")
            for g in gates]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"meaning gates of {measured.get('checkpoint', '?')}"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    held = sum(g.holds(measured) for g in gates)
    lines.append(f"{held} of {len(gates)} gates hold")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from clipscope.pipelines.worlds.shapes.train import CHECKPOINT

    parser = argparse.ArgumentParser(prog="python -m clipscope.pipelines.worlds.shapes.gates",
                                     description="Measure every meaning gate on a shapes CLIP checkpoint.")
    parser.add_argument("--checkpoint", default=str(CHECKPOINT), help="(default: the shipped model)")
    parser.add_argument("--work", help="folder for the stores (default: a temporary one)")
    parser.add_argument("--json", help="also write the measurements to this JSON file")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        print(f"error: --checkpoint {args.checkpoint} is not a file", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        measured = measure(args.checkpoint, Path(args.work or tmp), log=lambda line: print(line, file=sys.stderr))
    print(report(measured))
    if args.json:
        Path(args.json).write_text(json.dumps(measured, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
