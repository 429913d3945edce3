"""`clipscope textspan STORE --layers L... --pool NAME`: TextSpan for every head of those layers."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("store", help="run store path or URL (written: results go under reductions/textspan)")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="layers whose heads to decompose (default: the last 4 stored)")
    parser.add_argument("--pool", default="shapes-all",
                        help="text pool name (see clipscope.pipelines.text_pools.list_pools) or file:PATH")
    parser.add_argument("-m", "--basis-size", type=int, default=10, help="texts per head")
    parser.add_argument("--span-rank", type=int, default=80, help="rank r of the span of C the texts are projected on")
    parser.add_argument("--no-normalize", action="store_true",
                        help="do not divide head terms by ‖image embedding‖ (the reference code does)")
    parser.add_argument("--csv", default=None, help="also write the table (one row per pick) to this CSV")
    parser.add_argument("--workers", type=int, default=None, help="run on an embedded Ray with this many CPUs")


def run(args) -> int:
    import contextlib

    import pyarrow.csv as pacsv

    from clipscope.pipelines.text_pools import get_pool
    from clipscope.pipelines.textspan_job import TextSpanSettings, format_textspan, run_textspan
    from clipscope.storage.store import RunStore

    settings = TextSpanSettings(basis_size=args.basis_size, span_rank=args.span_rank, normalize=not args.no_normalize)
    store = RunStore.open(args.store, "r+")
    layers = args.layers or store.attrs.get("layers", {}).get("heads", [])[-4:]
    pool = get_pool(args.pool)
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
    return 0
