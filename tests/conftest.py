"""Shared fixtures.

PostgreSQL: `pg_admin_url` (env CHATD_TEST_PG, default the local server's
`postgres` database). `pg_url` is a fresh, migrated database per test, dropped
afterwards; `pg_empty_url` the same without migrations. When PostgreSQL is
unreachable these fixtures error: the tests fail, they never skip.

`store_url` is a migrated database of each kind ("sqlite", "postgres"), and
`store` an opened `SqlStore` on it (closed afterwards).

Redis: `own_redis` is a redis-server of the test's own (stop it, stall it, restart
it); `prefix` a key and channel prefix of its own on the machine's Redis.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy.engine import make_url

from loadtest.redis_server import RedisServer, private_redis
from storage.migrate import upgrade_async
from storage.sql import SqlStore
from storage.urls import normalize_url

PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
def prefix() -> str:
    return f"chatd-test-{secrets.token_hex(6)}:"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with private_redis(tmp_path) as server:
        yield server


def asyncpg_dsn(url: str) -> str:
    """A DSN that asyncpg.connect accepts (no `+driver`)."""
    return (
        make_url(normalize_url(url))
        .set(drivername="postgresql")
        .render_as_string(hide_password=False)
    )


@asynccontextmanager
async def fresh_pg_database(admin_url: str, *, migrate: bool = True) -> AsyncIterator[str]:
    """CREATE a randomly named database, (migrate it,) yield its asyncpg URL, DROP it."""
    name = f"chatd_test_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(asyncpg_dsn(admin_url), timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = make_url(normalize_url(admin_url)).set(database=name)
    url_s = url.render_as_string(hide_password=False)
    try:
        if migrate:
            await upgrade_async(url_s)
        yield url_s
    finally:
        admin = await asyncpg.connect(asyncpg_dsn(admin_url), timeout=10)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    return os.environ.get("CHATD_TEST_PG", PG_DEFAULT)


@pytest_asyncio.fixture
async def pg_url(pg_admin_url: str) -> AsyncIterator[str]:
    async with fresh_pg_database(pg_admin_url) as url:
        yield url


@pytest_asyncio.fixture
async def pg_empty_url(pg_admin_url: str) -> AsyncIterator[str]:
    async with fresh_pg_database(pg_admin_url, migrate=False) as url:
        yield url


@pytest_asyncio.fixture
async def sqlite_url(tmp_path: Path) -> str:
    url = normalize_url(str(tmp_path / "chatd.db"))
    await upgrade_async(url)
    return url


@pytest_asyncio.fixture(params=["sqlite", "postgres"])
async def store_url(
    request: pytest.FixtureRequest, tmp_path: Path, pg_admin_url: str
) -> AsyncIterator[str]:
    if request.param == "sqlite":
        url = normalize_url(str(tmp_path / "chatd.db"))
        await upgrade_async(url)
        yield url
    else:
        async with fresh_pg_database(pg_admin_url) as url:
            yield url


@pytest_asyncio.fixture
async def store(store_url: str) -> AsyncIterator[SqlStore]:
    s = SqlStore(store_url)
    await s.open()
    try:
        yield s
    finally:
        await s.close()
