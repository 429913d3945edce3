"""`--workers` and `--address`: where a command's work runs, the same flags with the same meaning (and the
same help) on every command that does work. See `clipscope.cluster.executor.open_executor`."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator

from clipscope.errors import ConfigError

WORKERS_HELP = ("run on an embedded local Ray with N CPU workers (with --address or RAY_ADDRESS: at most N "
                "at a time on that cluster); default: in this process, or the whole cluster")
ADDRESS_HELP = ("join an existing Ray cluster: auto (the one `ray start` runs on this machine), HOST:PORT or "
                "ray://HOST:10001; default: $RAY_ADDRESS (set by `ray job submit`), else no cluster")


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds --workers and --address (parsed as text: bad values get one line naming the flag, exit 2)."""
    group = parser.add_argument_group("where it runs")
    group.add_argument("--workers", default=None, metavar="N", help=WORKERS_HELP)
    group.add_argument("--address", default=None, metavar="ADDRESS", help=ADDRESS_HELP)


def workers_from(args: argparse.Namespace) -> int | None:
    """`--workers` as an integer ≥ 1, or None; ConfigError naming the flag otherwise."""
    value = args.workers
    if value is None:
        return None
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"--workers must be an integer ≥ 1, got {value}")
    return int(text)


def address_from(args: argparse.Namespace) -> str | None:
    """`--address` checked (auto, HOST:PORT or ray://HOST:PORT), or None (then RAY_ADDRESS applies)."""
    from clipscope.cluster.runtime import check_address

    return None if args.address is None else check_address(args.address, "--address")


def check_executor_args(args: argparse.Namespace) -> None:
    """Refuse bad --workers / --address values before any work (one line naming the flag)."""
    workers_from(args)
    address_from(args)


@contextlib.contextmanager
def executor_from_args(args: argparse.Namespace, *, store: str | None = None, progress: str = "auto") -> Iterator:
    """The executor `--workers` / `--address` / RAY_ADDRESS ask for, open for the body. On Ray, a `store`
    that lives in this process is refused, and a local path on a multi-node cluster is warned about."""
    from clipscope.cluster.executor import open_executor

    workers, address = workers_from(args), address_from(args)
    with open_executor(workers, address, progress=progress) as executor:
        if executor.is_ray:
            log = logging.getLogger("clipscope")
            log.info("running %s", executor.describe())
            if store is not None:
                _check_store_for_ray(store, executor.node_count(), log)
        yield executor


def _check_store_for_ray(store: str, nodes: int, log: logging.Logger) -> None:
    from clipscope.cluster.runtime import store_url_scope

    scope = store_url_scope(store)
    if scope == "process":
        raise ConfigError(f"store {store!r} lives in this Python process and Ray workers run in others; "
                          "drop --workers/--address (and RAY_ADDRESS) or use a path or s3:// / gs:// URL")
    if scope == "local" and nodes > 1:
        log.warning("store %s is a local path and the Ray cluster has %d nodes: every node must see it at the "
                    "same path (a shared filesystem), else use s3:// or gs://", store, nodes)
