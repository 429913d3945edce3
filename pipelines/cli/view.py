"""`clipscope view STORE`: serve a read-only web viewer over a store (binds 127.0.0.1:8000 by default);
`--build-index` writes the shards' member offset index into the store once instead (the only write)."""

from __future__ import annotations

import ipaddress
import logging
import sys

from clipscope.errors import ParameterError
from clipscope.pipelines.cli import exit_codes

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser) -> None:
    parser.add_argument("store", help="run store path or URL (s3://, gs://, file://)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; the viewer has no login, so "
                             "bind another address only on a trusted network)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--threads", type=int, default=4, help="request threads of the server (default 4)")
    parser.add_argument("--build-index", action="store_true",
                        help="write the member offset index of every shard that lacks one into the store "
                             "(members/part-*.parquet; takes the store's lock), then exit")
    parser.add_argument("--force", action="store_true", help="with --build-index: rebuild existing indices too")


def _check(args) -> None:
    if not 0 <= args.port <= 65535:
        raise ParameterError("port", f"must be in 0..65535, got {args.port}")
    if not 1 <= args.threads <= 64:
        raise ParameterError("threads", f"must be in 1..64, got {args.threads}")
    if args.host != "localhost":
        try:
            ipaddress.ip_address(args.host)
        except ValueError:
            raise ParameterError("host", f"must be an IP address or localhost, got {args.host!r}") from None


def run(args) -> int:
    _check(args)
    from clipscope.storage.store import RunStore

    if args.build_index:
        from clipscope.pipelines.data.member_index import build_member_index

        store = RunStore.open(args.store, "r+")
        built = build_member_index(store, force=args.force)
        print(f"member index: {len(built)} shard(s) indexed now, {len(store.info.shards) - len(built)} already "
              f"indexed, in {store.url}/members/")
        return exit_codes.OK

    from waitress import create_server

    from clipscope.pipelines.view import StoreView, create_app

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    view = StoreView(args.store)
    server = create_server(create_app(view), host=args.host, port=args.port, threads=args.threads)
    if args.host not in LOCAL_HOSTS:
        print(f"warning: serving {view.url} on {args.host}, reachable from other machines; the viewer has no login",
              file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"clipscope view: {view.url} at http://{host}:{server.effective_port}/ (read-only; Ctrl-C stops)",
          flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        return exit_codes.INTERRUPTED
    finally:
        server.close()
    return exit_codes.OK
