"""The connection budget: idle sockets that never say `hello` cannot keep a real user out.

The servers here get a small budget directly (`max_connections`), rather than a lowered
open-file limit; the deadlines are long, so that shedding, not a timeout, makes the room.
Every loop is bounded; everything waits on sockets closing, never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from chatd.server import Server

from .conftest import Clients, MakeConfig, Servers
from .helpers import RawConn, http_get, is_t

PATIENT: dict[str, Any] = {"open_timeout": 30.0, "hello_timeout": 30.0}


class IdleSockets:
    """TCP connections to a server that never send a byte; counts those the server closes.

    They are opened in batches below the listening socket's backlog (100): beyond it the
    kernel answers with SYN cookies and drops the ACKs it has no room for, so a client
    believes it is connected while the server never sees it (nor spends a file on it)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.writers: list[asyncio.StreamWriter] = []
        self.watchers: list[asyncio.Task[None]] = []
        self.closed = 0
        self._changed = asyncio.Event()

    async def open(self, n: int) -> None:
        opened = await asyncio.gather(
            *(asyncio.open_connection("127.0.0.1", self.port) for _ in range(n))
        )
        for reader, writer in opened:
            self.writers.append(writer)
            self.watchers.append(asyncio.create_task(self._watch(reader)))

    async def _watch(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            await reader.read(1)  # b"" at EOF: the server closed it
        self.closed += 1
        self._changed.set()

    async def flood(self, n: int, keep: int) -> None:
        """Open `n` more, 50 at a time; after each batch wait until the server has closed
        all but `keep` of every one opened so far."""
        for start in range(0, n, 50):
            await self.open(min(50, n - start))
            await self.wait_closed(len(self.writers) - keep)

    async def wait_closed(self, n: int, timeout: float = 10.0) -> None:
        """Wait until the server has closed `n` of them in all."""
        async with asyncio.timeout(timeout):
            while self.closed < n:
                self._changed.clear()
                await self._changed.wait()

    async def close(self) -> None:
        for w in self.writers:
            w.close()
        for t in self.watchers:
            t.cancel()
        await asyncio.gather(*self.watchers, return_exceptions=True)


async def shed_counts(srv: Server) -> dict[str, float]:
    status, body = await http_get(srv.port, "/metrics")
    assert status == 200
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith(("chatd_connections_shed_total", "chatd_connection_budget")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def test_a_real_user_gets_in_past_thousands_of_idle_sockets(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    srv = await servers.start(make_config(max_connections=60, pending_share=0.25, **PATIENT))
    pending = srv.admission.budget.pending
    assert pending == 15
    idle = IdleSockets(srv.port)
    try:
        await idle.flood(600, keep=pending)  # the oldest made room for the newest
        # Upgraded connections that never say hello are shed too (told 1013 first).
        ws_idle = [await clients.raw(srv) for _ in range(pending)]
        await idle.wait_closed(600)
        for i in range(20):
            # A burst of idle sockets just before each attempt: the pending share is full.
            await idle.open(30)
            await idle.wait_closed(600 + 30 * (i + 1) - pending)
            user = await clients.connect(srv, f"user{i}", wait_synced=True)
            assert user.welcome is not None and user.welcome.user == f"user{i}"
            await user.close()
        assert all(r.closed.is_set() for r in ws_idle)
        assert {r.close_code for r in ws_idle} == {1013}
    finally:
        await idle.close()
    counts = await shed_counts(srv)
    assert counts['chatd_connections_shed_total{stage="upgrade"}'] >= 600 + 20 * 30 - pending
    assert counts['chatd_connections_shed_total{stage="hello"}'] == pending
    assert counts['chatd_connection_budget{kind="pending"}'] == pending


async def test_authenticated_connections_are_never_shed(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    srv = await servers.start(make_config(max_connections=20, pending_share=0.5, **PATIENT))
    users = [await clients.raw_hello(srv, f"u{i}") for i in range(12)]
    idle = IdleSockets(srv.port)
    try:
        await idle.flood(40, keep=20 - 12)  # the whole budget is full: 12 + 8 idle
        late = await clients.raw_hello(srv, "late")  # sheds the oldest idle one
        await idle.wait_closed(40 - (20 - 13))
        users += [late] + [await clients.raw_hello(srv, f"v{i}") for i in range(7)]
        await idle.wait_closed(40)
        assert srv.admission.open == 20 and srv.admission.pending == 0
        # Full of authenticated connections: a new one is closed at once.
        with pytest.raises(Exception):  # noqa: B017 (websockets' handshake error, any kind)
            await RawConn.open(f"ws://127.0.0.1:{srv.port}/ws")
        for i, u in enumerate(users):
            assert (await u.request({"t": "ping", "id": i}))["t"] == "pong"
            assert not u.closed.is_set()
        await users.pop().close()  # room again
        again = await clients.raw_hello(srv, "again")
        await again.send({"t": "ping"})
        await again.next(is_t("pong"))
    finally:
        await idle.close()
