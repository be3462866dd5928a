"""Drain on shutdown: /readyz 503 first, then every write in flight commits and gets its
`sent`, connections close 1001, and after a restart every acknowledged message reaches
its recipient exactly once."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from chatd.auth import Authenticator
from chatd.server import Server

from .conftest import SECRET, Clients, MakeConfig
from .helpers import RawConn, http_get

PAIRS = 4


class Node:
    """`chatd serve` in a subprocess (a real SIGTERM), its output collected."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.port = 0

    @classmethod
    async def start(cls, db: str, *extra: str) -> Node:
        env = {**os.environ, "CHATD_JWT_SECRET": SECRET, "CHATD_DB": db}
        args = ["-m", "chatd", "serve", "--port", "0", "--send-rate", "5000"]
        args += ["--send-burst", "5000", "--hello-timeout", "5", *extra]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        node = cls(proc)
        async with asyncio.timeout(20):
            while not node.port:
                line = await node._line()
                m = re.search(r"chatd listening on ws://[^:]+:(\d+)/ws", line)
                if m:
                    node.port = int(m.group(1))
        node.reader = asyncio.create_task(node._drain())
        return node

    async def _line(self) -> str:
        assert self.proc.stdout is not None
        raw = await self.proc.stdout.readline()
        if not raw:
            raise AssertionError("server exited:\n" + "".join(self.lines))
        line = raw.decode(errors="replace")
        self.lines.append(line)
        return line

    async def _drain(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace"))

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            rc = await self.proc.wait()
        await self.reader
        return rc


async def _sender(conn: RawConn, me: str, to: str, stop: asyncio.Event) -> None:
    """Send as fast as `sent` comes back (8 in flight), until the connection closes."""
    n = 0
    try:
        while not stop.is_set():
            for _ in range(8):
                await conn.send({"t": "send", "id": n, "to": to, "cmid": f"{me}-{n}", "body": "x"})
                n += 1
            want = n - 8
            await conn.wait_until(
                lambda fr, want=want: sum(f.get("t") == "sent" for f in fr) >= want
            )
    except Exception:
        return  # closed by the drain


def _acked(conn: RawConn) -> list[str]:
    return [f["cmid"] for f in conn.frames if f.get("t") == "sent"]


def _msgs(conn: RawConn) -> list[dict[str, Any]]:
    return [f for f in conn.frames if f.get("t") == "msg"]


async def test_sigterm_under_load_loses_nothing_and_delivers_once(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/chatd.db"
    auth = Authenticator(SECRET)
    node = await Node.start(db)
    opened: list[RawConn] = []
    try:
        senders, receivers = [], []
        for i in range(PAIRS):
            for who, into in ((f"s{i}", senders), (f"r{i}", receivers)):
                conn = await RawConn.open(node.url)
                opened.append(conn)
                assert (await conn.hello(auth.mint(who)))["t"] == "welcome"
                await conn.next(lambda m: m.get("t") == "synced")
                into.append(conn)
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(_sender(c, f"s{i}", f"r{i}", stop)) for i, c in enumerate(senders)
        ]
        await senders[-1].wait_until(lambda _: sum(len(_acked(c)) for c in senders) >= 200, 10)
        assert await node.stop() == 0  # SIGTERM while every sender has sends in flight
        stop.set()
        await asyncio.gather(*tasks)
        for c in senders + receivers:
            await c.closed.wait()
            assert c.close_code == 1001
        lines = "".join(node.lines)
        assert "draining" in lines or "shutting down" in lines

        node = await Node.start(db)  # the restart: receivers resume with `since`
        for i, r in enumerate(receivers):
            since = max((m["cur"] for m in _msgs(r)), default=0)
            again = await RawConn.open(node.url)
            opened.append(again)
            assert (await again.hello(auth.mint(f"r{i}"), since=since))["t"] == "welcome"
            await again.next(lambda m: m.get("t") == "synced")
            got = [m["cmid"] for m in _msgs(r) + _msgs(again)]
            acked = _acked(senders[i])
            assert len(got) == len(set(got)), "a message delivered twice"
            # every `sent` is stored and delivered once; nothing stored went without it
            assert sorted(got) == sorted(acked)
    finally:
        for c in opened:
            await c.close()
        await node.stop()


async def test_readyz_is_503_while_draining(make_config: MakeConfig, clients: Clients) -> None:
    srv = Server(make_config(drain_grace=0.5))
    await srv.start()
    port = srv.port
    client = await clients.connect(srv, "alice")
    assert (await http_get(port, "/readyz"))[0] == 200
    stopping = asyncio.create_task(srv.stop())
    await asyncio.sleep(0)  # stop() runs up to its grace period of 0.5 s: draining
    assert await http_get(port, "/readyz") == (503, "draining\n")
    with pytest.raises(InvalidStatus):  # no new sessions while draining
        await RawConn.open(f"ws://127.0.0.1:{port}/ws")
    await stopping
    assert client.close_code == 1001
