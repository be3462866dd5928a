"""One Redis connection kept up: shared by the broker (`broker_redis`) and the fleet
limits (`limits_redis`). Raw redis-py `Connection`s (no pool: redis-py's async pool
raises at 100 connections), each run by `supervise`, which reconnects with backoff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio.connection import AbstractConnection, Connection, parse_url

__all__ = ["settings", "supervise", "why"]

log = logging.getLogger("chatd.redis")


def why(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def supervise(
    connect: Callable[[], AbstractConnection],
    session: Callable[[AbstractConnection], Awaitable[None]],
    up: asyncio.Event,
    what: str,
    timeout: float,
    backoff: tuple[float, float],
    lost: Callable[[], None],
) -> None:
    """Run `session` on a new connection from `connect` each time the last one fails,
    with jittered backoff; `lost` is called when a connection that was up (`up` set
    by the session) is lost."""
    delay = backoff[0]
    while True:
        conn = connect()
        try:
            async with asyncio.timeout(timeout):  # connect and handshake
                await conn.connect()  # type: ignore[no-untyped-call]
            await session(conn)
        except Exception as exc:  # loud once when lost, quiet while away
            level = logging.WARNING if up.is_set() else logging.DEBUG
            log.log(level, "%s lost: %s", what, why(exc))
        finally:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
        if up.is_set():
            up.clear()
            lost()
            delay = backoff[0]
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        delay = min(delay * 2, backoff[1])


def settings(url: str) -> tuple[Callable[..., AbstractConnection], dict[str, Any], str]:
    """(connection class, its arguments, host:port for logs) for a redis:// URL."""
    kwargs: dict[str, Any] = dict(parse_url(url))
    conn_class: Callable[..., AbstractConnection] = kwargs.pop("connection_class", Connection)
    where = f"{kwargs.get('host', kwargs.get('path'))}:{kwargs.get('port', '')}"
    # protocol 2: pub/sub messages as plain replies, not RESP3 pushes. No
    # socket_timeout: redis-py would then write through wait_for(), which on
    # Python 3.11 can swallow a cancel; our own timeouts bound every I/O.
    return conn_class, kwargs | {"protocol": 2, "socket_timeout": None}, where
