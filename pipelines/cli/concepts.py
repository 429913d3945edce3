"""`clipscope concepts STORE --layer L`: the concepts active in every image of a store (second-order paper
App. A.5): the texts of the neurons whose second-order effect on the image is unusually large, weighed by
their OMP coefficients and the effect's size. One image: `clipscope query STORE concepts KEY|ROW`."""

from __future__ import annotations

from clipscope.pipelines.cli import reduction_options
from clipscope.pipelines.cli._executor_args import add_executor_arguments, check_executor_args, executor_from_args


def add_concept_options(parser) -> None:
    """The options `concepts` and `query … concepts` share."""
    parser.add_argument("--layer", type=int, required=True,
                        help="neuron layer (needs `clipscope second-order` and `clipscope neurons` of it)")
    parser.add_argument("--m", type=int, default=None, help="OMP sparsity whose coefficients weigh the texts "
                                                            "(default: the largest stored m ≤ embedding dimension / 4, "
                                                            "the paper's 128 of 512)")
    parser.add_argument("--threshold", choices=("topk", "p98"), default="topk",
                        help="τ_n: the --rank-th largest centred norm of the neuron (topk, the reference's) or its "
                             "98th percentile (p98)")
    parser.add_argument("--rank", type=int, default=None,
                        help="with --threshold topk: which largest norm is τ_n (default: the stored top-k, 100)")
    parser.add_argument("--top", type=int, default=10, help="concepts kept per image")


def add_arguments(parser) -> None:
    parser.add_argument("store", help="run store path or URL (written: results go under reductions/concepts)")
    add_concept_options(parser)
    parser.add_argument("--show", type=int, default=5, help="images whose concepts are printed")
    reduction_options.add_arguments(parser)
    add_executor_arguments(parser)


def settings_from(args, **extra):
    from clipscope.pipelines.jobs import concepts

    return concepts.Settings(layer=args.layer, m=args.m, threshold=args.threshold, rank=args.rank, top=args.top,
                             **extra)


def run(args) -> int:
    from clipscope.pipelines.cli.notices import warn_if_random_init
    from clipscope.pipelines.jobs import concepts
    from clipscope.pipelines.texts.embedding_cache import stored_texts
    from clipscope.storage.store import RunStore

    settings = settings_from(args, **reduction_options.job_options(args))
    check_executor_args(args)
    store = RunStore.open(args.store, "r+")
    warn_if_random_init(store.attrs.get("model"))
    with executor_from_args(args, store=args.store) as executor:
        result = concepts.run(store, settings, executor)
    samples = store.read_samples()
    keys = None
    if samples is not None:
        keys = [""] * store.n_rows
        for row, key in zip(samples.column("row").to_pylist(), samples.column("key").to_pylist()):
            keys[row] = key
    print(concepts.report.format_summary(result, stored_texts(store, result.attrs["texts_key"]), keys,
                                         rows=max(0, args.show)))
    return 0


def add_query_parser(sub, formatter_class) -> None:
    """`clipscope query STORE concepts KEY|ROW --layer L`: the concepts of one image (nothing is written)."""
    query = sub.add_parser("concepts", formatter_class=formatter_class,
                           help="the concepts active in one image (second-order norms × OMP texts)")
    query.add_argument("sample", help="sample key, or a row number")
    add_concept_options(query)


def run_query(args, store, sample) -> None:
    from clipscope.pipelines.jobs import concepts
    from clipscope.storage.query import rows_for_keys

    row = int(rows_for_keys(store, [sample])[0]) if isinstance(sample, str) else int(sample)
    found = concepts.image_concepts(store, row, settings_from(args))
    print(concepts.report.format_image(found, sample if isinstance(sample, str) else None))
