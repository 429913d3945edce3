"""The `clipscope` command line. Each subcommand lives in its own module with
`add_arguments(parser)` and `run(args) -> int`; this file only wires them and turns every
`ClipscopeError` into one line on stderr with exit code 2 (4 for an `EnvironmentFault`); the
other codes are in `exit_codes`."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import signal
import sys
import threading
import warnings

from clipscope import __version__
from clipscope.errors import ClipscopeError, EnvironmentFault
from clipscope.pipelines.cli import exit_codes

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
    # CLIP-InterpreT analyses, head roles, zero-shot segmentation
    "roles": ("roles", "label heads by their TextSpan texts' properties; entanglement and association scores"),
    "segment": ("segment", "zero-shot segmentation of a store's masked images: pixel accuracy, mIoU, mAP"),
    "convert": ("convert", "convert a dataset layout (imagenet-seg: gtsegs_ijcv.mat) into webdataset shards"),
    # applications of the decompositions
    "concepts": ("concepts", "concept discovery: the texts of the neurons active in every image of a store"),
    "cues": ("cues", "spurious-cue mining (Eq. 6), the text-to-image prompt, and the fooling rate of generated images"),
    "worst-group": ("worst_group", "accuracy per (class, group) and the worst group under head ablations"),
    # Rosetta Neurons over a model zoo
    "maps": ("maps", "activation maps of any torch vision model over webdataset shards (Rosetta's inputs)"),
    "rosetta": ("rosetta", "Rosetta Neurons: exact Pearson best buddies, concepts and a dictionary over a model zoo"),
    # the web viewer
    "view": ("view", "a read-only web viewer over a store: run, heads, neurons, images, maps (127.0.0.1:8000)"),
}

DESCRIPTION = (
    "clipscope decomposes the image tower of a CLIP model (open_clip) into the direct effects of its "
    "heads, MLPs, tokens and the second-order effects of its neurons, over a webdataset of images, keeps "
    "them in a resumable zarr store, and reduces them: TextSpan texts per head, zero-shot accuracy under "
    "mean-ablation, neuron norms, principal components and sparse text decompositions."
)
EPILOG = (
    "Typical order on your own images: extract (--model and --pretrained are required), status, evaluate, "
    "textspan, second-order, neurons; `clipscope demo` runs all of it on the bundled shapes world. The "
    "methods and their sources: docs/methods.md in the repository."
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its help, except when there is none to show (None, False) or the
    help already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is None or action.default is False or action.default == argparse.SUPPRESS
                or "default" in text or not action.option_strings):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipscope", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"clipscope {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        mod = importlib.import_module(f"clipscope.pipelines.cli.{module}")
        mod.add_arguments(cmd)
        cmd.set_defaults(_module=mod, _flags=flag_names(cmd))
    return parser


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Python parameter name → the flag that sets it (`basis_size` → `--basis-size`), for error messages:
    a library error names the parameter, the CLI says which flag it came from. A command module maps
    parameters whose flag has another name in its optional `PARAMETER_FLAGS`."""
    names = {}
    for action in parser._actions:
        if action.option_strings:
            names[action.dest] = max(action.option_strings, key=len)
        elif isinstance(action, argparse._SubParsersAction):  # `query text …`: its sub-commands' flags
            for sub in action.choices.values():
                names.update(flag_names(sub))
    return names


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
    warnings.formatwarning = _format_warning
    previous = _handle_sigterm()
    try:
        check_output_paths(args)
        return int(args._module.run(args) or 0)
    except EnvironmentFault as err:
        print(f"clipscope {args.command}: error: {_cli_message(err, args)}", file=sys.stderr)
        return exit_codes.ENVIRONMENT
    except ClipscopeError as err:
        print(f"clipscope {args.command}: error: {_cli_message(err, args)}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    except Terminated:
        print(f"clipscope {args.command}: terminated (SIGTERM); rerun the same command to resume", file=sys.stderr)
        return exit_codes.TERMINATED
    except KeyboardInterrupt:
        print(f"clipscope {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return exit_codes.INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return exit_codes.OUTPUT_CLOSED
    except OSError as err:
        code, line = os_error_line(err)
        print(f"clipscope {args.command}: error: {line}", file=sys.stderr)
        return code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# Output flags of every command (argparse dest → flag, and whether it names a folder); checked
# before a command starts, so a bad path fails at once instead of after the work.
OUTPUT_FLAGS = {"csv": ("--csv", False), "png": ("--png", False), "plot": ("--plot", False),
                "parquet": ("--parquet", False), "json": ("--json", False), "to": ("--to", None),
                "out": ("--out", True)}


# Commands that write their results into STORE: a read-only store fails before the work.
STORE_WRITERS = ("textspan", "evaluate", "second-order", "neurons", "concepts", "cues", "worst-group")


def check_output_paths(args) -> None:
    from clipscope.storage.location import check_writable_target

    if args.command in STORE_WRITERS and isinstance(getattr(args, "store", None), str):
        check_writable_target(args.store, "STORE", folder=True)
    for dest, (flag, folder) in OUTPUT_FLAGS.items():
        value = getattr(args, dest, None)
        if not isinstance(value, str) or not value:
            continue  # unset, or a switch such as `status --json`
        if folder is None:  # `query export --to`: DEST.parquet is a file, anything else a folder of .npy
            folder = not value.endswith(".parquet")
        check_writable_target(value, flag, folder=folder)


def _cli_message(err: ClipscopeError, args) -> str:
    """The error's line with the parameters it names spelled as this command's flags."""
    names = {**getattr(args, "_flags", {}), **getattr(args._module, "PARAMETER_FLAGS", {})}
    return err.message_for(names)


_python_format_warning = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """clipscope's own warnings (a stale lock taken over…) as one line, Python's others as usual."""
    if category.__module__.startswith("clipscope."):
        return f"clipscope: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds like Ctrl-C (locks released)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _handle_sigterm():
    """Treat SIGTERM like SIGINT while a command runs; returns the previous handler (None: untouched)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def _silence_stdout() -> None:
    # The reader went away (`| head`): further writes, and the flush at exit, go nowhere.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


# errno → (exit code, what to do); any other errno is an environment fault (exit code 4).
_OS_ADVICE = {
    errno.ENOSPC: (exit_codes.ENVIRONMENT, "the device is full; free space or write elsewhere, then rerun"),
    errno.EDQUOT: (exit_codes.ENVIRONMENT, "the disk quota is exhausted; free space or write elsewhere, then rerun"),
    errno.EROFS: (exit_codes.ENVIRONMENT, "the file system is read-only; write elsewhere"),
    errno.EACCES: (exit_codes.ENVIRONMENT, "permission denied; fix the permissions or write elsewhere"),
    errno.EPERM: (exit_codes.ENVIRONMENT, "operation not permitted; fix the permissions or write elsewhere"),
    errno.ENOTDIR: (exit_codes.BAD_INPUT, "a part of the path is a file, not a folder; choose another path"),
    errno.EISDIR: (exit_codes.BAD_INPUT, "the path is a folder where a file was expected; choose another path"),
    errno.EEXIST: (exit_codes.BAD_INPUT, "the path already exists; choose another path"),
    errno.ENOENT: (exit_codes.BAD_INPUT, "no such file or folder; check the path"),
}


def os_error_line(err: OSError) -> tuple[int, str]:
    """(exit code, one line naming the path and what to do) for an OSError nobody caught."""
    code, advice = _OS_ADVICE.get(err.errno, (exit_codes.ENVIRONMENT, "check the machine and rerun"))
    what = err.strerror or type(err).__name__
    if err.filename is None:
        return code, f"{what}: {advice}"
    return code, f"{what}: {err.filename}: {advice}"


def entry() -> None:
    """Console-script entry: run `main`, then leave without interpreter teardown.

    Everything the command writes is flushed before `main` returns; skipping teardown avoids a
    known abort (exit 134, "terminate called without an active exception") when pyarrow's and
    zarr's native threads are torn down together at exit (apache/arrow#34314).
    """
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        code = code or exit_codes.OUTPUT_CLOSED
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    entry()
