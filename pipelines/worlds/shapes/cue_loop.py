"""The offline cue-mining loop (second-order paper §5.1, Table 3) with the shapes world's renderer playing
the text-to-image model.

For a pair (c_true, c_wrong) of shape names: mine cue words with `clipscope cues` restricted to the world's
vocabulary (colours, sizes, positions, counts, shapes other than c_wrong and c_true), render scenes that
show a c_true object *and* the cue words (`cue_plan`: a colour word colours the c_true object, then the
others; a size or position word places it; a shape word adds an object of that shape; a count word sets
the number of objects), and count the images the shapes CLIP scores on c_wrong's side,
⟨M(I), t̂(c_wrong) − t̂(c_true)⟩ > 0 (the reference's success rule). Baselines, rendered the same way:
the words Eq. 6 gives for random neurons (Table 3's "random neurons"), random words of the vocabulary (a fresh
draw per scene), the words whose text embedding is most similar to v = t̂(c_wrong) − t̂(c_true) (Table 3's
"similar words"), and no cue at all.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from clipscope.pipelines.jobs import cues
from clipscope.pipelines.models.loading import LoadedModel
from clipscope.pipelines.texts.embedding_cache import cached_text_embeddings
from clipscope.pipelines.worlds.shapes import world
from clipscope.pipelines.worlds.shapes.probes import encode_images
from clipscope.pipelines.worlds.shapes.spurious import render_plan
from clipscope.storage.store import RunStore

COUNT_TEXTS = {f"{world.COUNT_WORDS[c]} shape{'s' if c != 1 else ''}": c for c in world.COUNT_WORDS}


def vocabulary(true: str, wrong: str) -> list[str]:
    """The words a cue may be: every colour, size, position and count phrase, and the shapes but c_true, c_wrong."""
    shapes = [s for s in world.SHAPES if s not in (true, wrong)]
    return [*world.COLOURS, *world.SIZES, *world.POSITIONS, *COUNT_TEXTS, *shapes]


def cue_plan(true: str, cue_words: Sequence[str], rng: np.random.Generator, *, avoid: Sequence[str] = ()) -> list[dict]:
    """The objects of a scene showing a `true` object and the cue words (unnamed attributes drawn from `rng`;
    extra objects never take a shape of `avoid`)."""
    colours = [w for w in cue_words if w in world.COLOURS]
    extra_shapes = [w for w in cue_words if w in world.SHAPES]
    sizes = [w for w in cue_words if w in world.SIZES]
    cells = [world.POSITIONS.index(w) for w in cue_words if w in world.POSITIONS]
    counts = [COUNT_TEXTS[w] for w in cue_words if w in COUNT_TEXTS]
    n_objects = max(1 + len(extra_shapes), counts[0] if counts else 1)
    n_objects = min(n_objects, 3)
    free_shapes = [s for s in world.SHAPES if s not in (true, *avoid)]
    shapes = [true] + extra_shapes[:n_objects - 1]
    while len(shapes) < n_objects:
        shapes.append(free_shapes[int(rng.integers(len(free_shapes)))])
    names = list(world.COLOURS)
    chosen_colours = (colours + [names[int(rng.integers(len(names)))] for _ in range(n_objects)])[:n_objects]
    taken = cells[:1]
    free = [c for c in rng.permutation(world.GRID * world.GRID).tolist() if c not in taken]
    main_size = sizes[0] if sizes else list(world.SIZES)[int(rng.integers(len(world.SIZES)))]
    plan = []
    for k in range(n_objects):
        cell = taken[0] if (k == 0 and taken) else free.pop(0)
        size = main_size if k == 0 else list(world.SIZES)[int(rng.integers(list(world.SIZES).index(main_size) + 1))]
        plan.append({"shape": shapes[k], "colour": chosen_colours[k], "size": size, "cell": cell})
    return plan


@dataclass(frozen=True)
class PairOutcome:
    """Fooling rates of one (true, wrong) pair per cue source, and the words used."""

    true: str
    wrong: str
    mined: list[str]
    similar: list[str]
    rates: dict[str, float]  # mined, random_neurons, random, similar, none


def fooling(loaded: LoadedModel, plans: list[list[dict]], v: np.ndarray, seed: int) -> float:
    """Share of the rendered plans (at the model's input size) with ⟨M(I), v⟩ > 0."""
    config = world.WorldConfig(image_size=int(loaded.image_size[0])).validated()
    images = np.stack([render_plan(plan, seed, i, config).image for i, plan in enumerate(plans)])
    emb = encode_images(loaded, images).to(torch.float64).numpy()
    return float((emb @ v > 0).mean())


def run_pair(store: RunStore, loaded: LoadedModel, true: str, wrong: str, *, layers: tuple[int, ...],
             words: int = 4, neurons: int = 20, scenes: int = 60, seed: int = 0, m: int | None = None) -> PairOutcome:
    vocab = vocabulary(true, wrong)
    settings = cues.Settings(true=true, wrong=wrong, layers=layers, neurons=neurons, words=words, allowed=tuple(vocab),
                             m=m)
    mined = cues.run(store, settings).cues
    random_neuron_words = cues.run(store, dataclasses.replace(settings, random_neurons=seed)).cues
    v = cues.cue_direction_of(store, true, wrong, loaded=loaded)
    vocab_emb = cached_text_embeddings(store, vocab, pool_name="cues:vocabulary", loaded=loaded).astype(np.float64)
    vocab_emb /= np.linalg.norm(vocab_emb, axis=1, keepdims=True)
    similar = [vocab[i] for i in np.argsort(-(vocab_emb @ v), kind="stable")[:words]]
    rng = np.random.default_rng([seed, 1])
    sources = {
        "mined": lambda: mined,
        "random_neurons": lambda: random_neuron_words,
        "random": lambda: [vocab[i] for i in rng.choice(len(vocab), size=words, replace=False)],
        "similar": lambda: similar,
        "none": lambda: [],
    }
    rates = {}
    for name, draw in sources.items():
        plan_rng = np.random.default_rng([seed, 2])  # the same unnamed attributes for every source
        plans = [cue_plan(true, draw(), plan_rng, avoid=(wrong,)) for _ in range(scenes)]
        rates[name] = fooling(loaded, plans, v, seed)
    return PairOutcome(true, wrong, list(mined), similar, rates)


def format_outcomes(outcomes: Sequence[PairOutcome]) -> str:
    kinds = ("mined", "random_neurons", "random", "similar", "none")
    lines = ["cue mining in the shapes world: share of scenes of c_true + cue words scored towards c_wrong",
             f"{'c_true → c_wrong':<22} {'mined':>6} {'r.neur':>6} {'random':>6} {'similar':>7} {'none':>6}  "
             f"mined words"]
    for o in outcomes:
        r = o.rates
        lines.append(f"{o.true + ' → ' + o.wrong:<22} " + " ".join(f"{r[k]:{7 if k == 'similar' else 6}.3f}"
                                                                     for k in kinds) + f"  {', '.join(o.mined)}")
    means = {k: np.mean([o.rates[k] for o in outcomes]) for k in kinds}
    lines.append(f"{'mean':<22} " + " ".join(f"{means[k]:{7 if k == 'similar' else 6}.3f}" for k in kinds))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m clipscope.pipelines.worlds.shapes.cue_loop STORE --layers 1 2`: every ordered pair of shapes (or
    `--pairs star:heart …`) through the loop; STORE needs `second-order` and `neurons` results of the layers."""
    import argparse
    import itertools

    from clipscope.pipelines.models.loading import load_run_model

    parser = argparse.ArgumentParser(prog="python -m clipscope.pipelines.worlds.shapes.cue_loop")
    parser.add_argument("store")
    parser.add_argument("--layers", type=int, nargs="+", required=True)
    parser.add_argument("--pairs", nargs="*", default=None, help="TRUE:WRONG shape pairs (default: all 42)")
    parser.add_argument("--words", type=int, default=4)
    parser.add_argument("--neurons", type=int, default=100)
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--m", type=int, default=None, help="OMP sparsity whose coefficients are read (default: the largest stored)")
    args = parser.parse_args(argv)
    store = RunStore.open(args.store, "r+")
    loaded = load_run_model(store)
    pairs = ([tuple(p.split(":", 1)) for p in args.pairs] if args.pairs
             else list(itertools.permutations(world.SHAPES, 2)))
    outcomes = [run_pair(store, loaded, a, b, layers=tuple(args.layers), words=args.words, neurons=args.neurons,
                         scenes=args.scenes, m=args.m) for a, b in pairs]
    print(format_outcomes(outcomes))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
