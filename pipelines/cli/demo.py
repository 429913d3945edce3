"""`clipscope demo`: generate the shapes world, extract on embedded Ray, report head roles."""

from __future__ import annotations

from clipscope.pipelines.cli._executor_args import add_executor_arguments, address_from, workers_from


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="folder for the data, the store and the report")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=128)
    add_executor_arguments(parser)
    parser.set_defaults(workers="2")  # the demo runs on an embedded Ray with 2 CPUs unless told otherwise


def run(args) -> int:
    from clipscope.errors import ConfigError
    from clipscope.pipelines.worlds.shapes.demo import DemoConfig, run_demo

    workers, address = workers_from(args), address_from(args)
    for name in ("shards", "per_shard"):
        value = getattr(args, name)
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be an integer ≥ 1, got {value}")
    result = run_demo(DemoConfig(out=args.out, shards=args.shards, per_shard=args.per_shard, workers=workers,
                                 address=address))
    return 0 if result["summary"].ok else 1
