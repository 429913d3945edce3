"""`clipscope textspan STORE --layers L... --pool NAME [--curve]`: TextSpan for every head of those layers,
and optionally the zero-shot accuracy of the representation rebuilt from the heads' first m texts."""

from __future__ import annotations

from clipscope.pipelines.cli import reduction_options

# parameters of the jobs whose flag has another name (see cli.flag_names)
PARAMETER_FLAGS = {"basis_sizes": "--curve-sizes"}
from clipscope.pipelines.cli._executor_args import add_executor_arguments, check_executor_args, executor_from_args


def add_arguments(parser) -> None:
    parser.add_argument("store", help="run store path or URL (written: results go under reductions/textspan)")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="layers whose heads to decompose (default: the last 4 stored)")
    parser.add_argument("--pool", default="shapes-all",
                        help="text pool name (see clipscope.pipelines.texts.pools.list_pools) or file:PATH")
    parser.add_argument("-m", "--basis-size", type=int, default=None,
                        help="texts per head (default 10; with --curve, the largest of --curve-sizes)")
    parser.add_argument("--span-rank", default="auto",
                        help="rank r of the span of C the texts are projected on: auto (default; min(80, the "
                             "head's numerical rank), stable under float noise) or an integer, used literally "
                             "(80 reproduces the reference code)")
    parser.add_argument("--no-normalize", action="store_true",
                        help="do not divide head terms by ‖image embedding‖ (the reference code does)")
    parser.add_argument("--csv", default=None, help="also write the table (one row per pick) to this CSV")
    add_executor_arguments(parser)
    parser.add_argument("--curve", action="store_true",
                        help="then score zero-shot with each head projected onto its first m texts and every other "
                             "term mean-ablated, for each m of --curve-sizes (needs --basis-size ≥ the largest)")
    parser.add_argument("--curve-sizes", type=int, nargs="+", default=[10, 20, 30, 40, 50, 60],
                        help="the m of the curve (default 10 20 … 60, as in the thesis)")
    parser.add_argument("--task", default=None,
                        help="zero-shot task of the curve (see clipscope.pipelines.texts.zero_shot.list_tasks; "
                             "default: shapes for the shapes-world model, else imagenet)")
    reduction_options.add_arguments(parser)
    parser.add_argument("--plot", default=None,
                        help="PNG of the curve (default: textspan-curve-<task>.png in the current directory)")


def _warn_few_images(store, span_rank) -> None:
    """TextSpan's explained ratios mean little when the images are fewer than the span rank: K images
    span at most K − 1 centred directions, so a few texts 'explain' most of any head's variance."""
    import logging

    n_images = int(store.read_valid().sum())
    rank = 80 if span_rank == "auto" else int(span_rank)
    if n_images < rank:
        logging.getLogger("clipscope.cli.textspan").warning(
            "textspan: only %d images for a span rank of %d: %d images span at most %d directions, so a few "
            "texts explain most of any head's variance, trained or not; the explained ratios describe these "
            "images, not the head (use ≥ %d images)", n_images, rank, n_images, max(n_images - 1, 0), rank)


def _curve_sizes(result, sizes: tuple[int, ...]) -> tuple[int, ...]:
    """The curve's m values that every head has picks for; the larger ones are dropped with a notice
    (TextSpan stops at the pool's size and at the span rank)."""
    available = min(int(picks.shape[1]) for picks in result.indices.values())
    kept = tuple(m for m in sizes if m <= available)
    if kept != sizes:
        kept = kept if kept and kept[-1] == available else kept + (available,)
        print(f"textspan: every head has {available} picks (limited by the pool and the span rank), so the curve "
              f"uses m = {', '.join(map(str, kept))} instead of {', '.join(map(str, sizes))}")
    return kept


def run(args) -> int:
    import dataclasses

    import pyarrow.csv as pacsv

    from clipscope.errors import ConfigError
    from clipscope.pipelines.cli.notices import warn_if_random_init

    from clipscope.pipelines.jobs import textspan
    from clipscope.pipelines.jobs.textspan import curve
    from clipscope.pipelines.jobs.textspan.curve.report import format_curve, plot_curve
    from clipscope.pipelines.jobs.textspan.report import format_textspan
    from clipscope.pipelines.jobs.textspan.settings import parse_span_rank
    from clipscope.pipelines.texts.zero_shot import chance_line, default_task, get_task, labelled_count
    from clipscope.storage.store import RunStore

    options = reduction_options.job_options(args)
    curve_settings = curve.Settings(basis_sizes=tuple(args.curve_sizes), allow_incomplete=options["allow_incomplete"]
                                    ) if args.curve else None
    if args.basis_size is None:
        args.basis_size = max(10, max(curve_settings.sizes)) if args.curve else 10
        if args.curve and args.basis_size > 10:
            print(f"textspan: --curve scores up to {args.basis_size} texts per head, so TextSpan picks "
                  f"-m {args.basis_size} texts per head")
    settings = textspan.Settings(layers=None if args.layers is None else tuple(args.layers), pool=args.pool,
                                 basis_size=args.basis_size, span_rank=parse_span_rank(args.span_rank),
                                 normalize=not args.no_normalize, **options)
    if curve_settings is not None and max(curve_settings.sizes) > args.basis_size:
        raise ConfigError(f"--curve needs --basis-size ≥ the largest of --curve-sizes ({max(args.curve_sizes)}), "
                          f"got {args.basis_size}")
    check_executor_args(args)
    store = RunStore.open(args.store, "r+")
    warn_if_random_init(store.attrs.get("model"))
    task = get_task(args.task or default_task(store)) if args.curve else None
    if task is not None and labelled_count(store, task) == 0:  # before any work
        raise ConfigError(f"--curve scores zero-shot accuracy ({task.name}), but no valid sample of {store.url} has "
                          f"a label for it (no .cls in the shards); leave out --curve")
    with executor_from_args(args, store=args.store) as executor:
        result = textspan.run(store, settings, executor)
        print(format_textspan(result, per_head=args.basis_size))
        _warn_few_images(store, settings.span_rank)
        if args.csv:
            table = result.table()
            pacsv.write_csv(table, args.csv)
            print(f"wrote {table.num_rows} rows to {args.csv}")
        if curve_settings is not None:
            curve_settings = dataclasses.replace(curve_settings, layers=result.layers, task=task.name,
                                                 texts=result.texts,
                                                 basis_sizes=_curve_sizes(result, curve_settings.sizes))
            scored = curve.run(store, curve_settings, executor)
            print(format_curve(scored))
            print(chance_line(store, task))
            plot = args.plot or f"textspan-curve-{task.name}.png"
            plot_curve(scored, plot)
            print(f"wrote the curve to {plot} and {store.url} (reductions/textspan/curve/{task.name})")
    return 0
