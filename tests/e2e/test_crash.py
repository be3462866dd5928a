"""Invariant 1 under a real crash: every message answered with `sent` survives SIGKILL."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chatd.auth import Authenticator
from chatd.client import ChatClient
from protocol import Msg

SECRET = "c" * 40


class ServeProcess:
    """`chatd serve` as a child process (so that it can be killed for real)."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str) -> None:
        self.proc = proc
        self.url = url

    @classmethod
    async def start(cls, db: Path) -> ServeProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "chatd",
            "serve",
            "--port",
            "0",
            "--db",
            f"sqlite:///{db}",
            "--jwt-secret",
            SECRET,
            "--log-level",
            "WARNING",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = (await proc.stdout.readline()).decode()
        found = re.search(r"ws://\S+", line)
        assert found, f"no listening line: {line!r}"
        return cls(proc, found.group(0))

    async def kill(self) -> None:
        if self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


@pytest.fixture
async def procs() -> AsyncIterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    try:
        yield started
    finally:
        for p in started:
            await p.kill()


async def test_acknowledged_messages_survive_sigkill(
    tmp_path: Path, procs: list[ServeProcess]
) -> None:
    db = tmp_path / "crash.db"
    auth = Authenticator(SECRET)
    first = await ServeProcess.start(db)
    procs.append(first)
    alice = await ChatClient.connect(first.url, auth.mint("alice"))
    n = 40
    # Many in flight at once, so they share group commits; each is awaited to its `sent`.
    acked = await asyncio.gather(*(alice.send("bob", f"m{i}", cmid=f"k{i}") for i in range(n)))
    await first.kill()  # no shutdown, no flush: the process just ends
    await alice.close()

    second = await ServeProcess.start(db)
    procs.append(second)
    bob = await ChatClient.connect(second.url, auth.mint("bob"))
    got: list[Msg] = []
    while len(got) < n:
        got.append(await bob.recv_type(Msg, timeout=10))
    assert sorted(m.cmid for m in got) == sorted(s.cmid for s in acked)
    assert [m.seq for m in got] == list(range(1, n + 1))
    assert {m.mid for m in got} == {s.mid for s in acked}
    await bob.close()
