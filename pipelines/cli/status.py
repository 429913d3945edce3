"""`clipscope status STORE`: shards done / pending / failed, samples lost, invalid rows, bytes per array."""

from __future__ import annotations

import json

from clipscope.pipelines.cli import exit_codes


def add_arguments(parser) -> None:
    parser.add_argument("store", help="run store path or URL")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--verify", action="store_true",
                        help="recompute every done shard's row checksum and report corrupted chunks (reads all rows)")


def run(args) -> int:
    from clipscope.storage.status import format_status, store_status

    status = store_status(args.store, verify=args.verify)
    print(json.dumps(status, indent=1, default=str) if args.json else format_status(status))
    stages = status["stages"].values()
    if status.get("verify") and status["verify"]["corrupt"]:
        return exit_codes.CORRUPT
    if any(stage["failed"] for stage in stages):
        return exit_codes.FAILED_SHARDS
    if any(stage.get("partial") for stage in stages):
        return exit_codes.PARTIAL
    return exit_codes.OK
