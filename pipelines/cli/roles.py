"""`clipscope roles STORE`: label each head of the TextSpan layers with a property from its texts, and the
CLIP-InterpreT entanglement and association scores; optionally the head × property heat map."""

from __future__ import annotations

from clipscope.pipelines.cli import reduction_options
from clipscope.pipelines.cli._executor_args import add_executor_arguments, check_executor_args, executor_from_args

PARAMETER_FLAGS = {"m": "-m", "text_labels": "--text-labels", "labels": "--labels", "min_match": "--min-match"}


def add_arguments(parser) -> None:
    parser.add_argument("store", help="run store with TextSpan results (`clipscope textspan`); results go under "
                                      "reductions/roles")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="layers whose heads are labelled (default: those with TextSpan results, at most the "
                             "last 4, as the paper)")
    parser.add_argument("-m", type=int, default=5, help="a head's first TextSpan texts that vote for its label")
    parser.add_argument("--min-match", type=int, default=3,
                        help="texts on the label a head needs to count for the association score (the paper: 3)")
    parser.add_argument("--text-labels", default=None, metavar="FILE",
                        help="text<TAB>property lines tagging the pool's texts (default: the pool's built-in tags; "
                             "the shapes world has them)")
    parser.add_argument("--labels", default=None, metavar="CSV",
                        help="layer,head,label rows naming heads' labels directly (e.g. a person's or an LLM's)")
    parser.add_argument("--png", default=None, help="write the head × property heat map to this PNG")
    reduction_options.add_arguments(parser)
    add_executor_arguments(parser)


def run(args) -> int:
    from clipscope.pipelines.cli.notices import warn_if_random_init
    from clipscope.pipelines.jobs import roles
    from clipscope.storage.store import RunStore

    settings = roles.Settings(layers=None if args.layers is None else tuple(args.layers), m=args.m,
                              min_match=args.min_match, text_labels=args.text_labels, labels=args.labels,
                              **reduction_options.job_options(args))
    check_executor_args(args)
    store = RunStore.open(args.store, "r+")
    warn_if_random_init(store.attrs.get("model"))
    with executor_from_args(args, store=args.store) as executor:
        result = roles.run(store, settings, executor)
    print(roles.report.format_roles(result))
    if args.png:
        roles.report.plot_roles(result, args.png)
        print(f"wrote {args.png}")
    return 0
