"""Fixtures of the end-to-end tests: real servers on port 0, real clients.

- `make_config(**over)`: a Config on a SQLite file in tmp_path (Limits and Policy fields
  may be given by name too, e.g. `make_config(send_burst=3)`).
- `servers`: starts servers (`await servers.start(cfg)`), stops them at teardown.
- `srv`: one running server with the default config (short hello timeout).
- `clients`: connects ChatClients / RawConns to a server and closes them at teardown.
- `db_url` (parametrized sqlite/postgres) for the key flows that must also run on
  PostgreSQL (`pg_url` from tests/conftest.py: a fresh migrated database).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import pytest_asyncio

from chatd.client import ChatClient
from chatd.config import Config, Policy
from chatd.server import Server
from protocol import Limits

from .helpers import RawConn

SECRET = "e2e-test-secret-" + "x" * 64
_LIMIT_FIELDS = {f.name for f in dataclasses.fields(Limits)}
_POLICY_FIELDS = {f.name for f in dataclasses.fields(Policy)}


class MakeConfig(Protocol):
    def __call__(self, db: str | None = None, **over: Any) -> Config: ...


@pytest.fixture
def make_config(tmp_path: Path) -> MakeConfig:
    def make(db: str | None = None, **over: Any) -> Config:
        limits = {k: over.pop(k) for k in list(over) if k in _LIMIT_FIELDS}
        policy = {k: over.pop(k) for k in list(over) if k in _POLICY_FIELDS}
        policy.setdefault("hello_timeout", 0.5)
        cfg = Config(
            port=0,
            db=db or f"sqlite:///{tmp_path}/chatd.db",
            jwt_secret=SECRET,
            shutdown_timeout=3.0,
            limits=dataclasses.replace(Limits(), **limits),
            policy=dataclasses.replace(Policy(), **policy),
        )
        return dataclasses.replace(cfg, **over)

    return make


class Servers:
    def __init__(self) -> None:
        self.running: list[Server] = []

    async def start(self, cfg: Config) -> Server:
        srv = Server(cfg)
        await srv.start()
        self.running.append(srv)
        return srv

    async def stop(self, srv: Server) -> None:
        self.running.remove(srv)
        await srv.stop()

    async def stop_all(self) -> None:
        while self.running:
            await self.stop(self.running[-1])


@pytest_asyncio.fixture
async def servers() -> AsyncIterator[Servers]:
    s = Servers()
    try:
        yield s
    finally:
        await s.stop_all()


@pytest_asyncio.fixture
async def srv(servers: Servers, make_config: MakeConfig) -> Server:
    return await servers.start(make_config())


def ws_url(srv: Server) -> str:
    return f"ws://127.0.0.1:{srv.port}/ws"


class Clients:
    """Connects clients; every one is closed at teardown."""

    def __init__(self) -> None:
        self.opened: list[ChatClient | RawConn] = []

    async def connect(
        self,
        srv: Server,
        user: str,
        *,
        device: str = "default",
        since: int | None = None,
        wait_synced: bool = True,
        **kw: Any,
    ) -> ChatClient:
        c = ChatClient(ws_url(srv), srv.ctx.auth.mint(user), device=device, since=since, **kw)
        self.opened.append(c)
        await c.open(wait_synced=wait_synced)
        return c

    async def raw(self, srv: Server, **kw: Any) -> RawConn:
        r = await RawConn.open(ws_url(srv), **kw)
        self.opened.append(r)
        return r

    async def raw_hello(
        self, srv: Server, user: str, *, wait_synced: bool = True, **hello: Any
    ) -> RawConn:
        """A raw connection that said hello as `user` (and got `synced`)."""
        r = await self.raw(srv)
        welcome = await r.hello(srv.ctx.auth.mint(user), **hello)
        assert welcome["t"] == "welcome", welcome
        if wait_synced:
            await r.next(lambda m: m.get("t") == "synced")
        return r

    async def close_all(self) -> None:
        for c in reversed(self.opened):
            with contextlib.suppress(Exception):
                await c.close()
        self.opened.clear()


@pytest_asyncio.fixture
async def clients() -> AsyncIterator[Clients]:
    c = Clients()
    try:
        yield c
    finally:
        await c.close_all()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL of each kind; the postgres one from the `pg_url` fixture."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/chatd.db"
    url: str = request.getfixturevalue("pg_url")
    return url
