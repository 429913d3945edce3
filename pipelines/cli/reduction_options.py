"""Options every reduction command takes (`textspan`, `evaluate`, `second-order`, `neurons`): not a command."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="recompute even when the store holds this result for the same settings and extraction "
                             "(a rerun is otherwise a no-op that says so)")
    parser.add_argument("--allow-incomplete", action="store_true",
                        help="reduce a store whose extraction has failed or unfinished shards (their rows are left "
                             "out; the result's attributes record it) instead of refusing")


def job_options(args) -> dict:
    """The keyword arguments of a reduction job for these options."""
    return {"force": bool(args.force), "allow_incomplete": bool(args.allow_incomplete)}
