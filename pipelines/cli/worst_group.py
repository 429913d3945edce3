"""`clipscope worst-group STORE --task T`: zero-shot accuracy per (class, group) and the worst group under
mean-ablation of head sets — named, by role (`--heads-by-role colours`) or random (best of T) — alone or with
the reference's combined ablation (`--keep-last K`: with all heads of the earlier layers and all MLPs)."""

from __future__ import annotations

from clipscope.pipelines.cli import reduction_options
from clipscope.pipelines.cli._executor_args import add_executor_arguments, check_executor_args, executor_from_args


def add_arguments(parser) -> None:
    parser.add_argument("store", help="run store path or URL, extracted with --group-key (results under "
                                      "reductions/worst_group)")
    parser.add_argument("--task", required=True, help="zero-shot task (e.g. waterbirds, shapes-spurious)")
    parser.add_argument("--heads", nargs="*", default=[], help="head sets to ablate, each like L10H3,L11H0")
    parser.add_argument("--heads-by-role", default=None, metavar="PROPERTY",
                        help="ablate the heads `clipscope roles` labelled PROPERTY (e.g. colours)")
    parser.add_argument("--min-share", type=float, default=None,
                        help="with --heads-by-role: the heads whose stored share for PROPERTY is at least this, "
                             "instead of those labelled PROPERTY")
    parser.add_argument("--random-heads", type=int, default=None, metavar="R",
                        help="also ablate --trials random sets of R heads of the kept layers (best worst group reported)")
    parser.add_argument("--trials", type=int, default=5, help="random head sets drawn")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random head sets")
    parser.add_argument("--keep-last", type=int, default=None, metavar="K",
                        help="ablate every set together with all heads before the last K layers and all MLPs "
                             "(the reference's combined ablation; paper K = 4)")
    parser.add_argument("--separate", action="store_true",
                        help="with --keep-last: ablate the sets alone and keep_last_K as its own row")
    parser.add_argument("--means-from", default=None, metavar="STORE",
                        help="take the ablation means from this store's valid rows (a train split of the same model) "
                             "instead of the evaluated rows (the reference's)")
    reduction_options.add_arguments(parser)
    add_executor_arguments(parser)


def run(args) -> int:
    from clipscope.pipelines.cli.notices import warn_if_random_init
    from clipscope.pipelines.jobs import worst_group
    from clipscope.storage.store import RunStore

    settings = worst_group.Settings(task=args.task, heads=tuple(args.heads), heads_by_role=args.heads_by_role,
                                    min_share=args.min_share,
                                    random_heads=args.random_heads, trials=args.trials, seed=args.seed,
                                    keep_last=args.keep_last, combine=not args.separate, means_from=args.means_from,
                                    **reduction_options.job_options(args))
    check_executor_args(args)
    store = RunStore.open(args.store, "r+")
    warn_if_random_init(store.attrs.get("model"))
    with executor_from_args(args, store=args.store) as executor:
        result = worst_group.run(store, settings, executor)
    print(worst_group.report.format_table(result))
    return 0
