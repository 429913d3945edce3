"""The `clipscope` command line. Each subcommand lives in its own module with
`add_arguments(parser)` and `run(args) -> int`; this file only wires them and turns every
`ClipscopeError` into one line on stderr with exit code 2."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from clipscope import __version__
from clipscope.errors import ClipscopeError

# name -> (module under clipscope.pipelines.cli, one-line help)
COMMANDS = {
    "models": ("models", "list model architectures and pretrained tags"),
    "extract": ("extract", "extract decompositions of a webdataset into a store"),
    "status": ("status", "show what a store holds and which shards are done"),
    "query": ("query", "read embeddings, direct effects and top images from a store"),
    "textspan": ("textspan", "TextSpan: describe every head of chosen layers by texts from a pool"),
    "neurons": ("neurons", "describe every neuron of a layer by a sparse set of texts (OMP of its PC)"),
    "second-order": ("second_order", "second-order neuron effects of a layer: norms, top images, PCs, ablations"),
    "evaluate": ("evaluate", "zero-shot accuracy under mean-ablation of MLPs, heads and the class token"),
    "shapes": ("shapes", "the shapes world: generate it, train its CLIP, evaluate the CLIP"),
    "demo": ("demo", "generate the shapes world, extract on embedded Ray and report head roles"),

}

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipscope", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"clipscope {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(f"clipscope.pipelines.cli.{module}")
        mod.add_arguments(cmd)
        cmd.set_defaults(_module=mod)
    return parser

def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Subcommands that hand their options to another entry point (`shapes train`) take the rest.
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    # Libraries (open_clip logs every model build at INFO) stay at WARNING; clipscope speaks at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("clipscope").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args._module.run(args) or 0)
    except ClipscopeError as err:
        print(f"clipscope {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clipscope {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130

def entry() -> None:
    """Console-script entry: run `main`, then leave without interpreter teardown.

    Everything the command writes is flushed before `main` returns; skipping teardown avoids a
    known abort (exit 134, "terminate called without an active exception") when pyarrow's and
    zarr's native threads are torn down together at exit (apache/arrow#34314).
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    entry()
