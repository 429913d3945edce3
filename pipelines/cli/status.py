"""`clipscope status STORE`: shards done / pending / failed, samples, invalid rows, bytes per array."""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.add_argument("store", help="run store path or URL")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args) -> int:
    from clipscope.storage.status import format_status, store_status

    status = store_status(args.store)
    print(json.dumps(status, indent=1, default=str) if args.json else format_status(status))
    failed = sum(len(stage["failed"]) for stage in status["stages"].values())
    return 1 if failed else 0
