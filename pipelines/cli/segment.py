"""`clipscope segment STORE --method tokens …`: zero-shot segmentation of every stored image with its mask,
scored by the official protocol (pixel accuracy, mIoU, mAP), one method after another; optional overlays."""

from __future__ import annotations

from clipscope.pipelines.cli import reduction_options
from clipscope.pipelines.cli._executor_args import add_executor_arguments, check_executor_args, executor_from_args

PARAMETER_FLAGS = {"class_mode": "--class", "method": "--method", "top_neurons": "--top-neurons",
                   "centre_classes": "--centre-classes"}


def add_arguments(parser) -> None:
    parser.add_argument("store", help="run store extracted with --masks (results go under reductions/segmentation)")
    parser.add_argument("--method", nargs="+", default=["tokens"],
                        help="one or more registered methods: tokens (needs --token-sum), attention (needs "
                             "--attention-layers of the last layer), random (chance), and plug-ins (neurons)")
    parser.add_argument("--task", default=None, help="zero-shot task (default: shapes for the shapes model, else "
                                                     "imagenet)")
    parser.add_argument("--class", dest="class_mode", default="predicted",
                        help="predicted (the reference protocol) or label: whose class direction makes the map")
    clip = parser.add_mutually_exclusive_group()
    clip.add_argument("--clip", dest="clip", action="store_true", default=None,
                      help="clip the map at 0 before the min–max (default: the method's; tokens clip)")
    clip.add_argument("--no-clip", dest="clip", action="store_false", help="do not clip at 0")
    parser.add_argument("--threshold", default="auto",
                        help="auto (the method's: mean, or 0.5 for neurons), mean, or a number in [0, 1]")
    parser.add_argument("--target", default="foreground",
                        help="foreground (mask > 0, ImageNet-segmentation) or main (mask == 1: the shapes world's "
                             "main object)")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="neuron layers (the neurons method)")
    parser.add_argument("--top-neurons", type=int, default=200, help="neurons per class (the neurons method)")
    parser.add_argument("--centre-classes", action="store_true",
                        help="neurons: rank by |⟨r_n, w_c − w̄⟩|, the class-specific part of the class direction "
                             "(as the tokens method's heat), instead of the reference's |⟨r_n, w_c⟩|")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random method")
    parser.add_argument("--png", default=None, help="write overlays of the first --png-rows scored images here")
    parser.add_argument("--png-rows", type=int, default=4, help="images in the --png figure")
    reduction_options.add_arguments(parser)
    add_executor_arguments(parser)


def run(args) -> int:
    import dataclasses

    from clipscope.pipelines.cli.notices import warn_if_random_init
    from clipscope.pipelines.jobs import segment
    from clipscope.pipelines.jobs.segment.settings import parse_threshold
    from clipscope.storage.store import RunStore

    base = segment.Settings(method=args.method[0], task=args.task, class_mode=args.class_mode, clip=args.clip,
                            threshold=parse_threshold(args.threshold), target=args.target,
                            layers=None if args.layers is None else tuple(args.layers), top_neurons=args.top_neurons,
                            centre_classes=args.centre_classes, seed=args.seed, **reduction_options.job_options(args))
    check_executor_args(args)
    store = RunStore.open(args.store, "r+")
    warn_if_random_init(store.attrs.get("model"))
    settings = [dataclasses.replace(base, method=m) for m in args.method]
    for s in settings:
        segment.methods.get_method(s.method)  # an unknown name fails before any work
    results = []
    with executor_from_args(args, store=args.store) as executor:
        for s in settings:
            results.append(segment.run(store, s, executor))
    print(segment.report.format_segmentation(results))
    if args.png:
        _overlays(store, settings, results, args.png, args.png_rows)
    return 0


def _overlays(store, settings, results, path, n_rows) -> None:
    import numpy as np

    from clipscope.pipelines.jobs.segment.job import row_maps
    from clipscope.pipelines.models.loading import load_run_model
    from clipscope.pipelines.query.interpret_figures import input_picture, sample_image
    from clipscope.pipelines.jobs.segment.report import plot_segmentation

    loaded = load_run_model(store)
    rows = [int(r) for r in np.flatnonzero(results[0].scored)[:n_rows]]
    pictures = {row: input_picture(loaded, sample_image(store, row)) for row in rows}
    maps = {s.method: row_maps(store, s, rows, loaded=loaded) for s in settings}
    plot_segmentation(pictures, maps, path, title=f"Zero-shot segmentation ({results[0].task}, "
                                                  f"{settings[0].class_mode} class)")
    print(f"wrote {path}")
