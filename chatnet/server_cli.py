"""``chatserver``: run one chatnet replica."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .store import StoreError

DEFAULT_PORT = 1538


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatserver",
        description="Run a chatnet chat server (a replica with its own durable SQLite store).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default: {DEFAULT_PORT})")
    parser.add_argument(
        "--data-dir",
        help="directory of this replica's store (default: ./chatnet-data/<port>)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging threshold (default: INFO)",
    )
    parser.add_argument(
        "--slow-client-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="disconnect a client that reads nothing for this long while chat piles up (default: 60)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format=f"%(asctime)s {args.port} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    data_dir = args.data_dir or os.path.join("chatnet-data", str(args.port))
    from .server import ChatServer

    try:
        server = ChatServer(args.host, args.port, data_dir, slow_client_timeout=args.slow_client_timeout)
        server.start()
    except StoreError as exc:
        logging.getLogger("chatnet").error("%s", exc)
        return 1
    except OSError as exc:
        logging.getLogger("chatnet").error("cannot listen on %s:%d: %s", args.host, args.port, exc)
        return 1
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
