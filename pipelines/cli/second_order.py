"""`clipscope second-order STORE --layer L`: norms, sparsity, top images and rank-1 PCs of a layer's
neurons' second-order effects, then zero-shot accuracy under their mean-ablations."""

from __future__ import annotations

from clipscope.pipelines.cli import reduction_options
from clipscope.pipelines.cli._executor_args import add_executor_arguments, check_executor_args, executor_from_args


def add_arguments(parser) -> None:
    parser.add_argument("store", help="run store path or URL (written: results go under reductions/second_order)")
    parser.add_argument("--layer", type=int, required=True, help="MLP layer extracted with --second-order-layers")
    parser.add_argument("--top-k", type=int, default=100, help="images of largest effect norm per neuron")
    parser.add_argument("--task", default=None,
                        help="zero-shot task of the evaluation (default: shapes for the shapes model, else imagenet)")
    parser.add_argument("--no-evaluation", action="store_true", help="skip the zero-shot ablation table")
    reduction_options.add_arguments(parser)
    parser.add_argument("--neuron-chunk", type=int, default=256, help="neurons per PC task and per contraction")
    add_executor_arguments(parser)


def run(args) -> int:
    import dataclasses
    import logging

    from clipscope.pipelines.cli.notices import warn_if_random_init

    from clipscope.errors import ConfigError
    from clipscope.pipelines.jobs import second_order
    from clipscope.pipelines.jobs.second_order.report import format_evaluation, format_summary
    from clipscope.pipelines.texts.zero_shot import chance_line, default_task, get_task, labelled_count
    from clipscope.storage.store import RunStore

    settings = second_order.Settings(args.layer, top_k=args.top_k, neuron_chunk=args.neuron_chunk,
                                     **reduction_options.job_options(args))
    check_executor_args(args)
    store = RunStore.open(args.store, "r+")
    warn_if_random_init(store.attrs.get("model"))
    task = None if args.no_evaluation else get_task(args.task or default_task(store))
    if task is not None and labelled_count(store, task) == 0:
        # checked before any work: an unlabelled store would otherwise run the whole reduction, encode
        # the task's prompts and only then find nothing to score
        if args.task is not None:
            raise ConfigError(f"--task {task.name}: no valid sample of {store.url} has a label for it (the shards "
                              f"have no .cls entries); pass --no-evaluation to skip the zero-shot evaluation")
        print(f"second-order: no labelled samples in {store.url} (no .cls in the shards); skipping the zero-shot "
              f"evaluation ({task.name}); pass --no-evaluation to silence this")
        task = None
    settings = dataclasses.replace(settings, task=None if task is None else task.name)
    with executor_from_args(args, store=args.store) as executor:
        result = second_order.run(store, settings, executor)
    print(format_summary(result))
    n_images = int(store.read_valid().sum())
    if n_images < settings.top_k:
        logging.getLogger("clipscope.cli.second_order").warning(
            "second-order: only %d images for --top-k %d: each neuron's PC is fitted on all %d images, so "
            "the sparsity statistics and PCs describe these images, not the neuron (use more than %d images)",
            n_images, settings.top_k, n_images, settings.top_k)
    if task is not None:
        print(format_evaluation(result))
        print(chance_line(store, task))
    return 0
