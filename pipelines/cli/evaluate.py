"""`clipscope evaluate STORE`: zero-shot accuracy under mean-ablation of direct effects, from the store."""

from __future__ import annotations

from clipscope.pipelines.cli import reduction_options
from clipscope.pipelines.cli._executor_args import add_executor_arguments, check_executor_args, executor_from_args


def add_arguments(parser) -> None:
    parser.add_argument("store", help="run store path or URL (written: means and results go under reductions/)")
    parser.add_argument("--task", default=None,
                        help="zero-shot task (shapes, shapes-colour, shapes-shape, imagenet, imagenet-simple; "
                             "default: shapes for the shapes-world model, else imagenet)")
    parser.add_argument("--heads", action="append", default=[], metavar="L3H1,...",
                        help="also ablate this set of heads together (L<layer>H<head> or <layer>:<head>, "
                             "comma-separated); repeat for more sets")
    parser.add_argument("--keep-last", type=int, nargs="+", default=[], metavar="K",
                        help="also ablate the MLPs and every head except those of the last K stored layers")
    parser.add_argument("--no-cls-token", action="store_true",
                        help="leave out the class-token ablations (for stores extracted without direct/cls_token)")
    reduction_options.add_arguments(parser)
    parser.add_argument("--csv", default=None, help="also write the table to this CSV")
    parser.add_argument("--png", default=None, help="also plot accuracy against cumulative layer ablation here")
    add_executor_arguments(parser)


def _check_output(path: str | None, flag: str) -> None:
    import os

    from clipscope.errors import ConfigError

    if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ConfigError(f"{flag} {path}: its folder does not exist")


def run(args) -> int:
    from clipscope.pipelines.cli.notices import warn_if_random_init

    import pyarrow.csv as pacsv

    from clipscope.pipelines.jobs import evaluate
    from clipscope.pipelines.jobs.evaluate.report import format_evaluation, plot_evaluation
    from clipscope.pipelines.texts.zero_shot import default_task, format_chance, get_task, store_classes
    from clipscope.storage.store import RunStore

    check_executor_args(args)
    _check_output(args.csv, "--csv")
    _check_output(args.png, "--png")
    store = RunStore.open(args.store, "r+")
    warn_if_random_init(store.attrs.get("model"))
    task = get_task(args.task or default_task(store))
    settings = evaluate.Settings(task.name, heads=tuple(args.heads), keep_last=tuple(args.keep_last),
                                 include_cls=not args.no_cls_token, **reduction_options.job_options(args))
    with executor_from_args(args, store=args.store) as executor:
        result = evaluate.run(store, settings, executor)
    print(f"zero-shot task {task.name}: {result.n} labelled images, {len(task.classnames)} classes "
          f"({format_chance(store_classes(store, task), len(task.classnames))})")
    print(format_evaluation(result))
    if args.csv:
        table = result.table()
        pacsv.write_csv(table, args.csv)
        print(f"wrote {table.num_rows} rows to {args.csv}")
    if args.png:
        plot_evaluation(result, args.png, title=f"{task.name}: accumulated mean-ablation of heads",
                        chance=1 / len(task.classnames))
        print(f"wrote {args.png}")
    return 0
