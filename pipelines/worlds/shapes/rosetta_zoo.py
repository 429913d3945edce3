"""The offline Rosetta zoo of the shapes world (S3) and the demo's Rosetta step.

Stores over the same shards (row-aligned): the oracle (`maps --zoo shapes-oracle`), the shipped shapes
CLIP (`extract --activation-layers`, its MLP maps served directly), the shipped shapes CNN (`maps --zoo
shapes-cnn`) and seeded random-init controls of both. `gate_numbers` measures the S3 gates R1–R4 on
them; `demo_step` runs oracle × CLIP × CNN for `clipscope demo` and returns its report lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clipscope.pipelines.jobs import rosetta
from clipscope.pipelines.jobs.extract.job import run_extract
from clipscope.pipelines.jobs.extract.settings import ExtractConfig
from clipscope.pipelines.jobs.maps.job import run_maps
from clipscope.pipelines.jobs.maps.settings import MapsConfig
from clipscope.pipelines.jobs.rosetta.report import format_summary
from clipscope.pipelines.worlds.shapes import world
from clipscope.pipelines.worlds.shapes.oracle import CONCEPTS
from clipscope.pipelines.worlds.shapes.train import CHECKPOINT, SHAPES_MODEL
from clipscope.storage.store import RunStore

GEOMETRY = 48
SELF_K = 2  # oracle synonyms per unit (three grids per concept)
CLIP_LAYERS = (0, 1, 2, 3)


@dataclass(frozen=True)
class Zoo:
    oracle: str
    clip: str
    cnn: str
    clip_random: str | None = None
    cnn_random: str | None = None


def build_zoo(data: str, out: str | Path, *, rows_per_chunk: int = 64, controls: bool = True,
              executor=None, clip_store: str | None = None) -> Zoo:
    """Make (or resume) the zoo's stores under `out` from the shards `data`; `clip_store`: an existing
    extract store of the shipped CLIP with --activation-layers 0 1 2 3 (the demo's) instead of a new one."""
    out = Path(out)
    common = dict(data=(str(data),), rows_per_chunk=rows_per_chunk, batch_size=32)

    def maps(name: str, zoo: str, seed: int = 0) -> str:
        config = MapsConfig(out=str(out / name), zoo=zoo, seed=seed, geometry=GEOMETRY, dtype="float32", **common)
        run_maps(config, progress_display="off", executor=executor)
        return config.out

    def clip(name: str, pretrained: str, seed: int = 0) -> str:
        config = ExtractConfig(out=str(out / name), model=SHAPES_MODEL, pretrained=pretrained, seed=seed,
                               heads_layers=(3,), activation_layers=CLIP_LAYERS, **common)
        run_extract(config, progress_display="off", executor=executor)
        return config.out

    stores = {"oracle": maps("oracle.zarr", "shapes-oracle"),
              "clip": clip_store or clip("clip.zarr", str(CHECKPOINT)),
              "cnn": maps("cnn.zarr", "shapes-cnn")}
    if controls:
        stores["clip_random"] = clip("clip-random.zarr", "none", seed=1)
        stores["cnn_random"] = maps("cnn-random.zarr", "shapes-cnn-random", seed=1)
    return Zoo(**stores)


def colour_layers(grids=(6,)) -> tuple[str, ...]:
    return tuple(f"colour_{g}" for g in grids)


def run_pair(anchor: str, other: str, name: str, anchor_layers: tuple[str, ...] = (), *, k: int = 5,
             executor=None, **options) -> rosetta.Result:
    settings = rosetta.Settings(others=(other,), name=name, layers=(anchor_layers, ()) if anchor_layers else (),
                                k=k, self_k=k, **options)
    return rosetta.run(RunStore.open(anchor, "r+"), settings, executor)


def colour_buddies(result: rosetta.Result, threshold: float) -> tuple[int, float]:
    """(how many oracle colour units have a buddy with r ≥ threshold, the largest buddy r of a colour unit)."""
    a = result.arrays
    pairs, corr = a["pairs/m1/buddies"], a["pairs/m1/buddy_corr"]
    layers = result.attrs["inputs"][0]["layers"]
    colour_units = {u for u, li in enumerate(a["units/anchor/layer_index"]) if layers[li].startswith("colour_")}
    best: dict[int, float] = {}
    for (i, _), r in zip(pairs.tolist(), corr.tolist()):
        if i in colour_units:
            best[i] = max(best.get(i, -1.0), r)
    return sum(r >= threshold for r in best.values()), max(best.values(), default=float("nan"))


def buddy_stats(result: rosetta.Result) -> tuple[int, float]:
    corr = result.arrays["pairs/m1/buddy_corr"]
    return len(corr), float(corr.mean()) if corr.size else float("nan")


def colour_concepts(result: rosetta.Result) -> dict[str, list[int]]:
    """Oracle colour name → the concepts holding a tuple anchored at one of its colour units."""
    a = result.arrays
    layers = result.attrs["inputs"][0]["layers"]
    out: dict[str, set[int]] = {}
    for t, c in zip(a["tuples/members"], a["tuples/concept"]):
        layer = layers[a["units/anchor/layer_index"][t[0]]]
        if layer.startswith("colour_"):
            name = CONCEPTS["colour"][int(a["units/anchor/channel"][t[0]])]
            out.setdefault(name, set()).add(int(c))
    return {k: sorted(v) for k, v in out.items()}


def example_precision(result: rosetta.Result, store: RunStore) -> tuple[int, int]:
    """(examples holding an object of the concept's colour, examples checked) over the colour concepts whose
    tuples are all anchored at units of one colour."""
    a = result.arrays
    layers = result.attrs["inputs"][0]["layers"]
    meta = {r["row"]: r for r in store.read_samples().to_pylist()}
    colours_of = _row_colours(store, meta)
    hits = total = 0
    for c in sorted(set(a["tuples/concept"].tolist())):
        anchors = a["tuples/members"][a["tuples/concept"] == c][:, 0]
        names = {CONCEPTS["colour"][int(a["units/anchor/channel"][u])] for u in anchors
                 if layers[a["units/anchor/layer_index"][u]].startswith("colour_")}
        if len(names) != 1 or len(anchors) != sum(layers[a["units/anchor/layer_index"][u]].startswith("colour_")
                                                    for u in anchors):
            continue
        colour = names.pop()
        for row in a["dictionary/example_rows"][c]:
            if row >= 0:
                total += 1
                hits += colour in colours_of[int(row)]
    return hits, total


def _row_colours(store: RunStore, meta: dict) -> dict[int, set[str]]:
    out = {}
    for row, record in meta.items():
        seed, index = _seed_index(record["key"])
        scene = world.render(index, seed, world.world_config(48))
        out[row] = {o.colour for o in scene.objects}
    return out


def _seed_index(key: str) -> tuple[int, int]:
    # world.sample_key: "shapes-s{seed}-{index:08d}"
    _, seed, index = key.split("-")
    return int(seed[1:]), int(index)


def same_colour_concepts(result: rosetta.Result) -> tuple[int, int]:
    """(colours whose oracle units at every grid end in one concept, colours whose units are in tuples at all
    grids); also checks different colours do not share a concept (returned via `colour_concepts`)."""
    a = result.arrays
    layers = result.attrs["inputs"][0]["layers"]
    concept_of_unit = {int(t[0]): int(c) for t, c in zip(a["tuples/members"], a["tuples/concept"])}
    together = present = 0
    for ch, _ in enumerate(CONCEPTS["colour"]):
        units = [u for u, li in enumerate(a["units/anchor/layer_index"])
                 if layers[li].startswith("colour_") and int(a["units/anchor/channel"][u]) == ch]
        concepts = {concept_of_unit[u] for u in units if u in concept_of_unit}
        if all(u in concept_of_unit for u in units):
            present += 1
            together += len(concepts) == 1
    return together, present


def demo_step(store: str, data: str, out: str | Path, executor=None) -> list[str]:
    """The demo's Rosetta step over the demo's shards (`store`: the demo's store, for its rows per chunk):
    oracle × shapes CLIP × shapes CNN;
    returns report lines and writes rosetta_dictionary.png."""
    out = Path(out)
    zoo = build_zoo(data, out / "zoo", controls=False, executor=executor,
                    rows_per_chunk=RunStore.open(store, "r").rows_per_chunk)
    # self K = 2: each oracle colour unit has exactly two synonyms (its other grids); the thesis's K = 5 would
    # link every colour unit to three units of other colours and merge colours into one concept
    settings = rosetta.Settings(others=(zoo.clip, zoo.cnn), name="demo", layers=(colour_layers((6, 12, 24)), (), ()),
                                self_k=SELF_K)
    anchor = RunStore.open(zoo.oracle, "r+")
    result = rosetta.run(anchor, settings, executor)
    from clipscope.pipelines.jobs.rosetta.figure import plot_dictionary

    plot_dictionary(result, anchor, out / "rosetta_dictionary.png")
    concepts = colour_concepts(result)
    return ["Rosetta Neurons (oracle colour maps at 6/12/24 × shapes CLIP MLPs × shapes CNN stages; self K = 2):",
            format_summary(result, max_concepts=12, max_members=3),
            "  colour → concepts: " + ", ".join(f"{k} {v}" for k, v in sorted(concepts.items())),
            f"  dictionary figure: {out / 'rosetta_dictionary.png'}"]
