"""`clipscope rosetta ANCHOR OTHER...`: Rosetta Neurons over a model zoo (results in the anchor store)."""

from __future__ import annotations

from clipscope.errors import ConfigError
from clipscope.pipelines.cli._executor_args import add_executor_arguments, check_executor_args, executor_from_args

PARAMETER_FLAGS = {"k": "-k", "self_k": "--self-k"}


def add_arguments(parser) -> None:
    parser.add_argument("anchor", help="the anchor's store (the thesis's G; written: reductions/rosetta/NAME)")
    parser.add_argument("others", nargs="+", metavar="OTHER", help="the other models' stores (row-aligned)")
    parser.add_argument("--name", default="default", help="name of the result group")
    parser.add_argument("--layers", nargs="+", default=(), metavar="STORE=L,L",
                        help="map layers to use per store (default: every map layer of each store)")
    parser.add_argument("-k", "--k", dest="k", type=int, default=5, help="best-buddy K (Eq. 4.3)")
    parser.add_argument("--self-k", type=int, default=5, help="K of the anchor's self best buddies (concepts)")
    parser.add_argument("--k-keep", type=int, default=16, help="length of the streamed top lists (≥ K)")
    parser.add_argument("--bb-rule", default="symmetric",
                        help="symmetric (thesis: mutual top-K) or reference (official code: top-1 forward, top-K back)")
    parser.add_argument("--score", default="pearson",
                        help="pearson (exact global coefficient) or reference (official per-batch cosine, comparison only)")
    parser.add_argument("--reference-batch", type=int, default=10, help="images per batch of --score reference")
    parser.add_argument("--tile", type=int, default=2048, help="units per tile side")
    parser.add_argument("--keep-matrix", action="store_true", help="also store the full float32 matrix per model")
    parser.add_argument("--matmul-dtype", default="float64", help="float64 (default) or float32 (GPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--examples", type=int, default=8, help="dictionary images per concept")
    parser.add_argument("--split-rows", action="store_true",
                        help="one task per (tile, row block) instead of per tile (few large tiles, many workers)")
    parser.add_argument("--png", default=None, help="also render the dictionary (thesis Fig. 4.2) to this PNG")
    parser.add_argument("--force", action="store_true", help="recompute even when the result is up to date")
    add_executor_arguments(parser)


def parse_layers(values, anchor: str, others: list[str]) -> tuple[tuple[str, ...], ...]:
    """`STORE=L,L` per store → one tuple of layer names per model (anchor first); () when none given."""
    if not values:
        return ()
    urls = [anchor, *others]
    out: list[tuple[str, ...]] = [() for _ in urls]
    for value in values:
        store, sep, names = value.partition("=")
        if not sep or store not in urls:
            raise ConfigError(f"--layers expects STORE=L,L with STORE one of the stores given, got {value!r}")
        out[urls.index(store)] = tuple(n for n in names.split(",") if n)
    return tuple(out)


def run(args) -> int:
    from clipscope.pipelines.jobs import rosetta
    from clipscope.pipelines.jobs.rosetta.report import format_summary
    from clipscope.storage.store import RunStore

    check_executor_args(args)
    settings = rosetta.Settings(
        others=tuple(args.others), name=args.name, layers=parse_layers(args.layers, args.anchor, args.others),
        k=args.k, self_k=args.self_k, k_keep=args.k_keep, bb_rule=args.bb_rule, score=args.score,
        reference_batch=args.reference_batch, tile=args.tile, keep_matrix=args.keep_matrix,
        matmul_dtype=args.matmul_dtype, device=args.device, examples=args.examples, split_rows=args.split_rows,
        force=args.force)
    store = RunStore.open(args.anchor, "r+")
    counts = {"computed": 0, "reused": 0}

    def on_tile(tile, reused: bool) -> None:
        counts["reused" if reused else "computed"] += 1

    with executor_from_args(args, store=args.anchor) as executor:
        result = rosetta.run(store, settings, executor, on_tile=on_tile)
    print(format_summary(result))
    print(f"tiles: {counts['computed']} computed, {counts['reused']} reused from done markers")
    if args.png:
        from clipscope.pipelines.jobs.rosetta.figure import plot_dictionary

        plot_dictionary(result, store, args.png)
        print(f"dictionary: {args.png}")
    return 0


# --- `clipscope query STORE rosetta …` -----------------------------------------------------------------


def add_query_parser(sub, formatter_class) -> None:
    query = sub.add_parser("rosetta", formatter_class=formatter_class,
                           help="a Rosetta result: its concepts, one concept's tuples and images, or one unit")
    query.add_argument("--name", default="default", help="the result's --name")
    query.add_argument("item", nargs="+", metavar="ITEM",
                       help="concepts | concept C | unit MODEL:LAYER:CHANNEL (MODEL: anchor, m1, …)")


def _unit_id(result, text: str) -> tuple[int, int]:
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in result.models:
        raise ConfigError(f"unit must be MODEL:LAYER:CHANNEL with MODEL one of {', '.join(result.models)}, "
                          f"got {text!r}")
    model = result.models.index(parts[0])
    layers = result.attrs["inputs"][model]["layers"]
    if parts[1] not in layers or not parts[2].isdigit():
        raise ConfigError(f"unit {text!r}: layer must be one of {', '.join(layers)} and CHANNEL an integer")
    table = result.units(parts[0])
    hit = (table["layer_index"] == layers.index(parts[1])) & (table["channel"] == int(parts[2]))
    if not hit.any():
        raise ConfigError(f"unit {text!r}: layer {parts[1]} has {int((table['layer_index'] == layers.index(parts[1])).sum())} "
                          "channels")
    return model, int(hit.nonzero()[0][0])


def run_query(args, store) -> int:
    from clipscope.pipelines.jobs.rosetta.report import concept_members, format_concepts
    from clipscope.pipelines.jobs.rosetta.result import read_any

    result = read_any(store, args.name)
    a, what = result.arrays, args.item
    if what == ["concepts"]:
        print(format_concepts(result, max_concepts=10 ** 6, max_members=4))
    elif what[0] == "concept" and len(what) == 2 and what[1].isdigit():
        members = concept_members(result)
        c = int(what[1])
        if c not in members:
            raise ConfigError(f"concept must be one of 0…{len(members) - 1}, got {c}")
        corr = a["tuples/corr"][a["tuples/concept"] == c]
        for tuple_, rs in zip(members[c], corr):
            print(" ↔ ".join(tuple_) + "   r " + ", ".join(f"{r:.3f}" for r in rs))
        keys = {r["row"]: r["key"] for r in store.read_samples().to_pylist()}
        for row, score in zip(a["dictionary/example_rows"][c], a["dictionary/example_scores"][c]):
            if row >= 0:
                print(f"  example row {row} ({keys.get(int(row), '?')}): score {score:.3f}")
    elif what[0] == "unit" and len(what) == 2:
        model, unit = _unit_id(result, what[1])
        label = result.models[model]
        if model == 0:
            for m, other in enumerate(result.models[1:], start=1):
                pairs = a[f"pairs/{other}/buddies"]
                for (i, j), r in zip(pairs, a[f"pairs/{other}/buddy_corr"]):
                    if i == unit:
                        print(f"  best buddy {result.describe_unit(m, int(j))}  r {r:.3f}")
            concept = a["tuples/concept"][a["tuples/members"][:, 0] == unit]
            print(f"  concept: {sorted(set(concept.tolist())) or 'none (no tuple)'}")
        else:
            index, corr = a[f"pairs/{label}/col_top_index"][unit], a[f"pairs/{label}/col_top_corr"][unit]
            for i, r in zip(index[:result.attrs["k"]], corr[:result.attrs["k"]]):
                if i >= 0:
                    print(f"  top anchor unit {result.describe_unit(0, int(i))}  r {r:.3f}")
    else:
        raise ConfigError(f"query rosetta expects concepts, concept C or unit MODEL:LAYER:CHANNEL, got {' '.join(what)}")
    return 0
