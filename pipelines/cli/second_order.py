"""`clipscope second-order STORE --layer L`: norms, sparsity, top images and rank-1 PCs of a layer's
neurons' second-order effects, then zero-shot accuracy under their mean-ablations."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("store", help="run store path or URL (written: results go under reductions/second_order)")
    parser.add_argument("--layer", type=int, required=True, help="MLP layer extracted with --second-order-layers")
    parser.add_argument("--top-k", type=int, default=100, help="images of largest effect norm per neuron")
    parser.add_argument("--task", default=None,
                        help="zero-shot task of the evaluation (default: shapes for the shapes model, else imagenet)")
    parser.add_argument("--no-evaluation", action="store_true", help="skip the zero-shot ablation table")
    parser.add_argument("--neuron-chunk", type=int, default=256, help="neurons per PC task and per contraction")
    parser.add_argument("--workers", type=int, default=None, help="run on an embedded Ray with this many CPUs")


def run(args) -> int:
    import contextlib

    from clipscope.errors import ConfigError
    from clipscope.pipelines.jobs.second_order.ablation import format_evaluation, run_evaluation
    from clipscope.pipelines.jobs.second_order.job import SecondOrderSettings, format_summary, run_second_order
    from clipscope.pipelines.texts.zero_shot import default_task, get_task
    from clipscope.storage.store import RunStore

    settings = SecondOrderSettings(top_k=args.top_k, neuron_chunk=args.neuron_chunk)
    if args.workers is not None and (isinstance(args.workers, bool) or args.workers < 1):
        raise ConfigError(f"--workers must be an integer ≥ 1, got {args.workers!r}")
    store = RunStore.open(args.store, "r+")
    task = None if args.no_evaluation else get_task(args.task or default_task(store))
    runtime = contextlib.nullcontext()
    if args.workers:
        from clipscope.cluster.runtime import ray_runtime

        runtime = ray_runtime(num_cpus=args.workers)
    with runtime:
        result = run_second_order(store, args.layer, settings=settings, use_ray=bool(args.workers))
        print(format_summary(result))
        if task is not None:
            table = run_evaluation(store, args.layer, task, settings=settings, use_ray=bool(args.workers))
            print(format_evaluation(table, task.name))
    return 0
