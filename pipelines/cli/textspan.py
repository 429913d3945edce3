"""`clipscope textspan STORE --layers L... --pool NAME [--curve]`: TextSpan for every head of those layers,
and optionally the zero-shot accuracy of the representation rebuilt from the heads' first m texts."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("store", help="run store path or URL (written: results go under reductions/textspan)")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="layers whose heads to decompose (default: the last 4 stored)")
    parser.add_argument("--pool", default="shapes-all",
                        help="text pool name (see clipscope.pipelines.texts.pools.list_pools) or file:PATH")
    parser.add_argument("-m", "--basis-size", type=int, default=10, help="texts per head")
    parser.add_argument("--span-rank", type=int, default=80, help="rank r of the span of C the texts are projected on")
    parser.add_argument("--no-normalize", action="store_true",
                        help="do not divide head terms by ‖image embedding‖ (the reference code does)")
    parser.add_argument("--csv", default=None, help="also write the table (one row per pick) to this CSV")
    parser.add_argument("--workers", type=int, default=None, help="run on an embedded Ray with this many CPUs")
    parser.add_argument("--curve", action="store_true",
                        help="then score zero-shot with each head projected onto its first m texts and every other "
                             "term mean-ablated, for each m of --curve-sizes (needs --basis-size ≥ the largest)")
    parser.add_argument("--curve-sizes", type=int, nargs="+", default=[10, 20, 30, 40, 50, 60],
                        help="the m of the curve (default 10 20 … 60, as in the thesis)")
    parser.add_argument("--task", default=None,
                        help="zero-shot task of the curve (see clipscope.pipelines.texts.zero_shot.list_tasks; "
                             "default: shapes for the shapes-world model, else imagenet)")
    parser.add_argument("--plot", default=None,
                        help="PNG of the curve (default: textspan-curve-<task>.png in the current directory)")


def run(args) -> int:
    import contextlib

    import pyarrow.csv as pacsv

    from clipscope.errors import ConfigError
    from clipscope.pipelines.texts.pools import get_pool
    from clipscope.pipelines.jobs.textspan.curve import check_basis_sizes, format_curve, plot_curve, reconstruction_curve
    from clipscope.pipelines.jobs.textspan.job import TextSpanSettings, format_textspan, run_textspan
    from clipscope.pipelines.texts.zero_shot import default_task, get_task
    from clipscope.storage.store import RunStore

    settings = TextSpanSettings(basis_size=args.basis_size, span_rank=args.span_rank, normalize=not args.no_normalize)
    if args.curve and max(check_basis_sizes(args.curve_sizes)) > args.basis_size:
        raise ConfigError(f"--curve needs --basis-size ≥ the largest of --curve-sizes ({max(args.curve_sizes)}), "
                          f"got {args.basis_size}")
    store = RunStore.open(args.store, "r+")
    layers = args.layers or store.attrs.get("layers", {}).get("heads", [])[-4:]
    pool = get_pool(args.pool)
    task = get_task(args.task or default_task(store)) if args.curve else None
    runtime = contextlib.nullcontext()
    if args.workers:
        from clipscope.cluster.runtime import ray_runtime

        runtime = ray_runtime(num_cpus=args.workers)
    with runtime:
        table = run_textspan(store, layers, pool.texts, settings=settings, pool_name=pool.name,
                             use_ray=bool(args.workers))
        print(format_textspan(table, per_head=args.basis_size))
        if args.csv:
            pacsv.write_csv(table, args.csv)
            print(f"wrote {table.num_rows} rows to {args.csv}")
        if task is not None:
            result = reconstruction_curve(store, layers, texts=pool.texts, task=task, basis_sizes=args.curve_sizes,
                                          use_ray=bool(args.workers))
            print(format_curve(result))
            plot = args.plot or f"textspan-curve-{task.name}.png"
            plot_curve(result, plot)
            print(f"wrote the curve to {plot} and {store.url} (reductions/textspan/curve/{task.name})")
    return 0
