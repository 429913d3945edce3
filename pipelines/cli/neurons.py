"""`clipscope neurons STORE --layer L`: describe every neuron of a layer by a sparse set of texts (OMP of its
second-order PC) and measure the zero-shot accuracy of the text reconstruction (second-order paper §4)."""

from __future__ import annotations

from clipscope.pipelines.cli import reduction_options
from clipscope.pipelines.cli._executor_args import add_executor_arguments, check_executor_args, executor_from_args

TOP_NEURONS_DEFAULT = 10


def add_arguments(parser) -> None:
    parser.add_argument("store", help="run store path or URL (written: results go under reductions/omp)")
    parser.add_argument("--layer", type=int, required=True, help="neuron layer (its PCs come from `clipscope second-order`)")
    parser.add_argument("--pool", default="shapes-all",
                        help="text pool name (see clipscope.pipelines.texts.pools.list_pools) or file:PATH")
    parser.add_argument("--m", type=int, default=8,
                        help="texts per neuron shown (solved too; OMP always solves m = 4, 8, …, 128 capped by the pool)")
    parser.add_argument("--top", type=int, default=5, help="texts shown per neuron (by |coefficient|)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--neurons", default=None, help="comma-separated neuron indices to show, e.g. 0,5,9")
    which.add_argument("--top-neurons", type=int, default=None,
                       help=f"show the neurons with the largest mean second-order norm (default {TOP_NEURONS_DEFAULT} "
                            f"when norm_mean is stored, else the first {TOP_NEURONS_DEFAULT})")
    parser.add_argument("--reference-preprocessing", action="store_true",
                        help="the reference code's dictionary: texts centred and scaled per dimension")
    parser.add_argument("--task", default=None,
                        help="zero-shot task of the reconstruction accuracy (default: shapes for the shapes model, "
                             "else imagenet)")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the reconstruction accuracy")
    reduction_options.add_arguments(parser)
    parser.add_argument("--parquet", default=None, help="also write the shown neurons' texts to this Parquet file")
    parser.add_argument("--json", default=None, help="also write the shown neurons' texts to this JSON file")
    add_executor_arguments(parser)


def _positive(name: str, value) -> int:
    from clipscope.errors import ConfigError

    if value is not None and value < 1:
        raise ConfigError(f"{name} must be an integer ≥ 1, got {value}")
    return value


def _shown_neurons(args, store, n_neurons: int) -> list[int]:
    import numpy as np

    from clipscope.errors import ConfigError, StoreError
    from clipscope.pipelines.jobs.neurons.job import optional_second_order, second_order_command

    if args.neurons is not None:
        try:
            chosen = [int(v) for v in args.neurons.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--neurons must be comma-separated integers, got {args.neurons!r}") from None
        if not chosen:
            raise ConfigError("--neurons must name at least one neuron")
        bad = [n for n in chosen if not 0 <= n < n_neurons]
        if bad:
            raise ConfigError(f"--neurons must lie in 0..{n_neurons - 1}, got {bad[0]}")
        return chosen
    norms = optional_second_order(store, args.layer, "norm_mean")
    if norms is None:
        if args.top_neurons is not None:
            raise StoreError(f"--top-neurons ranks by reductions/second_order/layer_{args.layer}/norm_mean, which "
                             f"{store.url} lacks; run `{second_order_command(store, args.layer)}`")
        return list(range(min(TOP_NEURONS_DEFAULT, n_neurons)))
    count = args.top_neurons or TOP_NEURONS_DEFAULT
    return [int(n) for n in np.argsort(-np.asarray(norms, np.float64), kind="stable")[:count]]


def run(args) -> int:
    from clipscope.pipelines.cli.notices import warn_if_random_init
    import json

    import pyarrow.parquet as pq

    from clipscope.errors import ConfigError
    from clipscope.pipelines.jobs.neurons import Settings, run as run_neurons
    from clipscope.pipelines.jobs.neurons.job import optional_second_order, read_pcs
    from clipscope.pipelines.jobs.neurons.report import format_accuracy, format_neurons, neuron_table
    from clipscope.pipelines.jobs.neurons.settings import DEFAULT_M
    from clipscope.pipelines.texts.pools import get_pool
    from clipscope.pipelines.texts.zero_shot import chance_line, default_task, get_task, labelled_count
    from clipscope.storage.store import RunStore

    _positive("--top", args.top)
    _positive("--top-neurons", args.top_neurons)
    check_executor_args(args)
    pool = get_pool(args.pool)
    if not 1 <= args.m <= len(pool.texts):
        raise ConfigError(f"--m must be in 1..{len(pool.texts)} (the pool {pool.name!r} has {len(pool.texts)} texts), "
                          f"got {args.m}")
    if args.task is not None and not args.no_accuracy:
        get_task(args.task)  # an unknown task fails before any work
    store = RunStore.open(args.store, "r+")
    warn_if_random_init(store.attrs.get("model"))
    n_neurons = read_pcs(store, args.layer).shape[0]
    if not args.no_accuracy and labelled_count(store, get_task(args.task or default_task(store))) == 0:
        task_name = args.task or default_task(store)
        if args.task is not None:
            raise ConfigError(f"--task {task_name}: no valid sample of {store.url} has a label for it (the shards "
                              f"have no .cls entries); pass --no-accuracy to skip the reconstruction accuracy")
        print(f"neurons: no labelled samples in {store.url} (no .cls in the shards); skipping the reconstruction "
              f"accuracy ({task_name}); pass --no-accuracy to silence this")
        args.no_accuracy = True
    shown = _shown_neurons(args, store, n_neurons)
    settings = Settings(layer=args.layer, texts=tuple(pool.texts), pool_name=pool.name, m=DEFAULT_M + (args.m,),
                        reference_preprocessing=args.reference_preprocessing, accuracy=not args.no_accuracy,
                        task=args.task, **reduction_options.job_options(args))
    with executor_from_args(args, store=args.store) as executor:
        result = run_neurons(store, settings, executor)
    accuracy = result.accuracy if settings.accuracy else None
    table = neuron_table(result, pool, m=args.m, top=args.top, neurons=shown,
                         pc_explained=optional_second_order(store, args.layer, "pc_explained"))
    print(f"layer {args.layer}: {n_neurons} neurons, pool {pool.name} ({len(pool.texts)} texts), "
          f"m = {', '.join(map(str, result.m))}, dictionary {result.attrs['preprocessing']}")
    print(format_neurons(table, shown, args.m))
    if accuracy is not None:
        print(format_accuracy(accuracy))
        print(chance_line(store, get_task(accuracy.task)))
    if args.parquet:
        pq.write_table(table, args.parquet)
        print(f"wrote {table.num_rows} rows to {args.parquet}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(table.to_pylist(), fh, ensure_ascii=False, indent=1)
        print(f"wrote {table.num_rows} rows to {args.json}")
    return 0
