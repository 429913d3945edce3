"""`clipscope shapes generate|train|train-cnn|evaluate`: the shapes world, its CLIP and its CNN (Rosetta zoo).

`generate` and `train` hand their arguments to ``python -m clipscope.pipelines.worlds.shapes.world`` and
``python -m clipscope.pipelines.worlds.shapes.train`` (same options; ``clipscope shapes train -- --help``).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="shapes_command", metavar="ACTION", required=True)
    gen = sub.add_parser("generate", help="write the shapes world as webdataset shards",
                         description="Write the shapes world (options: clipscope shapes generate -- --help).")
    gen.add_argument("args", nargs=argparse.REMAINDER, help="OUT [--shards N] [--per-shard N] [--seed S] …")
    gen.set_defaults(passthrough=True)
    train = sub.add_parser("train", help="train the shapes-world CLIP and write its fp16 checkpoint",
                           description="Train clipscope-shapes (options: clipscope shapes train -- --help).")
    train.add_argument("args", nargs=argparse.REMAINDER, help="[--out PATH] [--steps N] [--check] …")
    train.set_defaults(passthrough=True)
    cnn = sub.add_parser("train-cnn", help="train the shapes-world CNN (Rosetta zoo) and write its fp16 checkpoint",
                         description="Train shapes-cnn (options: clipscope shapes train-cnn -- --help).")
    cnn.add_argument("args", nargs=argparse.REMAINDER, help="[--out PATH] [--steps N] [--check] …")
    cnn.set_defaults(passthrough=True)
    ev = sub.add_parser("evaluate", help="held-out zero-shot, retrieval, segmentation and ablation numbers")
    ev.add_argument("--checkpoint", help="a checkpoint other than the shipped one")
    ev.add_argument("--seed", type=int, default=12345, help="held-out world seed (training uses seed 1)")
    ev.add_argument("--n", type=int, default=1000, help="scenes per evaluation set")
    ev.add_argument("--json", help="also write the numbers to this JSON file")


def run(args) -> int:
    from clipscope.errors import ConfigError

    # Everything after the action word, in the order typed (argparse would reorder options).
    words = args.argv[args.argv.index("shapes") + 1:]
    rest = words[words.index(args.shapes_command) + 1:]
    rest = rest[1:] if rest[:1] == ["--"] else rest
    if args.shapes_command == "generate":
        from clipscope.pipelines.worlds.shapes.world import main

        return main(rest)
    if args.shapes_command == "train":
        from clipscope.pipelines.worlds.shapes.train import main

        return main(rest)
    if args.shapes_command == "train-cnn":
        from clipscope.pipelines.worlds.shapes.cnn import main as train_cnn

        return train_cnn(rest)
    if args.n < 10:
        raise ConfigError(f"--n must be an integer ≥ 10, got {args.n}")
    if args.seed < 0:
        raise ConfigError(f"--seed must be an integer ≥ 0, got {args.seed}")
    from clipscope.pipelines.worlds.shapes.evaluate import evaluate
    from clipscope.pipelines.worlds.shapes.train import load_shapes_model

    numbers = evaluate(load_shapes_model(path=args.checkpoint), seed=args.seed, n=args.n)
    text = json.dumps(numbers, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    return 0
