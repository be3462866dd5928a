"""`chatd serve | token | migrate`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence

from storage.base import StorageError

from . import __version__
from .auth import Authenticator
from .config import Config, add_options, config_from_args
from .errors import ChatdError
from .logs import setup_logging
from .server import Server, authenticator_for

log = logging.getLogger("chatd.cli")

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chatd", description="chatd: a direct-messaging server")
    p.add_argument("--version", action="version", version=f"chatd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server (applies pending migrations first)")
    add_options(serve)

    top = sub.add_parser("top", help="a live view of the /metrics of one or more nodes")
    top.add_argument("urls", nargs="+", metavar="URL", help="http://HOST:PORT (/metrics)")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes [1]")
    top.add_argument("--once", action="store_true", help="print one frame and exit")

    token = sub.add_parser("token", help="print a JWT for USER, signed with the server's secret")
    token.add_argument("user")
    token.add_argument("--ttl", type=float, default=86400.0, help="seconds of validity [86400]")
    minting = {"db", "jwt_secret", "jwt_secret_file", "jwt_algorithms", "jwt_public_key"}
    minting |= {"jwt_max_ttl", "jwt_issuer", "jwt_audience", "log_level"}
    add_options(token, minting)

    migrate = sub.add_parser("migrate", help="apply pending database migrations and exit")
    add_options(migrate, {"db", "log_level", "log_format"})
    return p


def _install_loop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def tune_gc(young: int) -> None:
    """Fewer, cheaper garbage collections for a long-running server.

    A frame allocates a few short-lived objects, so CPython's default (a young
    pass every 700 allocations, and every few seconds a full pass over every
    connection's objects) stops the event loop often under load. Measured at
    2,000 msg/s (loadtest/README.md): p99 send -> msg fell from 90-150 ms to
    30-34 ms with a young pass every 20,000. Startup's objects (modules, schema,
    config) are frozen out of every pass.
    """
    gc.freeze()
    if young > 0:
        gc.set_threshold(young, 50, 100)


async def _serve(config: Config) -> None:
    server = Server(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():  # the second signal: exit at once
            log.warning("second signal: exiting now")
            os._exit(1)
        log.info("signal: draining (a second one exits at once)")
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        await server.start()  # a failed start still closes what it opened (the store)
        tune_gc(config.gc_young)
        print(f"chatd listening on ws://{config.host}:{server.port}/ws", flush=True)
        await stop.wait()
    finally:
        await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "top":
            from .top import run_top

            return run_top(args.urls, args.interval, args.once)
        config = config_from_args(args)
        setup_logging(config.log_level, config.log_format, config.node)
        if args.command == "serve" and config.workers > 1:
            from .workers import run_workers

            return run_workers(config, list(argv if argv is not None else sys.argv[1:])[1:])
        if args.command == "serve":
            _install_loop()
            asyncio.run(_serve(config))
        elif args.command == "token":
            auth: Authenticator = authenticator_for(config)
            print(auth.mint(args.user, args.ttl))
        elif args.command == "migrate":
            from storage.migrate import upgrade

            upgrade(config.db_url)
            print("migrations applied", flush=True)
    except ChatdError as exc:
        print(f"chatd: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"chatd: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:  # e.g. the database does not answer at start
        print(f"chatd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the port is taken, the secret file cannot be written, ...
        print(f"chatd: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
