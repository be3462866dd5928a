"""`SqlStore`: the Store on SQLAlchemy 2 asyncio Core, SQLite (aiosqlite) or PostgreSQL (asyncpg).

Writes go through one group commit: `send()` / `mark()` queue an op
(`storage.ops`) and return its future; a single writer task
(`storage.writer.GroupCommitWriter`: the queue, the commit window, retries and
failures) commits the queued ops in batches, one transaction each, and the batch
plan (`storage.plan`: the statements of a batch, steps 1-6) decides what a batch
writes, through `storage.batch_io`. Reads (`storage.reads`) use a pool of their
own. This module wires them together and owns the engines and connections:

- PostgreSQL: the writer's batch runs on a plain asyncpg connection
  (`storage.batch_pg`): steps 1-4 and step 6 are server-side functions, one round
  trip each, each its own transaction (the write checks that the rows are as the
  plan saw them; after a conflict the batch runs again with SELECT ... FOR UPDATE
  locks held from the read to the COMMIT). `?statement_cache_size=0` in
  the URL: behind PgBouncer in transaction pooling mode (no named prepared
  statement outlives its transaction, for the writer and the readers).
- SQLite: the whole transaction goes in one hop to a writer thread, on its own
  stdlib `sqlite3` connection (BEGIN IMMEDIATE: one writer at a time), which
  keeps the rows it wrote between batches (`batch_io.SqliteCache`). The readers
  use aiosqlite. Every connection runs in WAL mode with synchronous=FULL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from storage.base import (
    ConvSummary,
    Event,
    HistoryPage,
    MarkKind,
    MarkOutcome,
    SendOutcome,
    StorageUnavailable,
    StoreStats,
)
from storage.batch_io import SqliteCache, SqliteIO
from storage.batch_pg import PgBatchWriter
from storage.ops import MarkOp, Op, SendOp
from storage.plan import apply_batch
from storage.reads import SqlReads
from storage.urls import asyncpg_dsn, pg_statement_cache_size, sqlite_path
from storage.writer import GroupCommitWriter

__all__ = ["SqlStore"]

_SQLITE_MIN = (3, 33, 0)
_SQLITE_BUSY_TIMEOUT_MS = 10_000
_PG_CONNECT_TIMEOUT_S = 10.0


def _sqlite_pragmas(dbapi_conn: Any) -> None:
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _unique_statement_name() -> str:
    """A prepared statement's name no other client of a PgBouncer server connection uses."""
    return f"__chatd_{uuid.uuid4().hex}__"


def _sqlite_reader_setup(engine: Engine) -> None:
    """The readers' pragmas (see `_sqlite_pragmas`); their transactions opened with a
    plain BEGIN (writes go through the writer thread's own connection)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: ConnectionPoolEntry) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        _sqlite_pragmas(dbapi_conn)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")


class SqlStore:
    """The Store on SQLite or PostgreSQL. See the module docstring.

    `url`: anything `storage.urls.normalize_url` accepts. `group_commit=False`
    runs one op per transaction (for benchmarks). `max_batch`: ops per
    transaction at most. `commit_window`: seconds between the starts of two
    transactions at least (0: commit as soon as the writer is free); ops that
    arrive in between join the next one. `pool_size`: connections for reads.
    `writers` (PostgreSQL only): batches committed at once, each on a writer
    connection of its own (1: one after the other, one connection).
    """

    BATCH_SIZE_BOUNDS: ClassVar[tuple[int, ...]] = GroupCommitWriter.BATCH_SIZE_BOUNDS
    """Upper bounds of the buckets of `batch_sizes` (ops per transaction)."""

    def __init__(
        self,
        url: str,
        *,
        group_commit: bool = True,
        max_batch: int = 256,
        pool_size: int = 10,
        commit_window: float = 0.0,
        writers: int = 1,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.url, self._statement_cache_size = pg_statement_cache_size(url)
        self.group_commit = group_commit
        self.pool_size = pool_size
        self._sqlite = self.url.startswith("sqlite")
        self._writer = GroupCommitWriter(
            self._commit_batch,
            max_batch=max_batch if group_commit else 1,
            commit_window=commit_window if group_commit else 0.0,
            concurrency=1 if self._sqlite else writers,
        )
        self._reads = SqlReads()
        self._pg_writer: PgBatchWriter | None = None
        self._sqlite_conn: sqlite3.Connection | None = None
        """The SQLite writer's connection: used only on the `_sqlite_exec` thread."""
        self._sqlite_exec: ThreadPoolExecutor | None = None
        self._sqlite_cache = SqliteCache()
        """The writer's users / convs / members rows between batches (writer thread only)."""

    # ------------------------------------------------------- group-commit figures

    @property
    def max_batch(self) -> int:
        """Ops per transaction at most (1 without group commit)."""
        return self._writer.max_batch

    @property
    def commit_window(self) -> float:
        """Seconds between the starts of two transactions at least: under load the
        writes of a window share one transaction; after an idle window a write
        is committed at once."""
        return self._writer.commit_window

    @property
    def batches(self) -> int:
        """Batches (transactions) committed."""
        return self._writer.batches

    @property
    def batched_ops(self) -> int:
        """Ops in the committed batches."""
        return self._writer.batched_ops

    @property
    def batch_sizes(self) -> list[int]:
        """Committed batches by size: `batch_sizes[i]` counts those with
        BATCH_SIZE_BOUNDS[i-1] < ops <= BATCH_SIZE_BOUNDS[i] (the last: above all)."""
        return self._writer.batch_sizes

    def stats(self) -> StoreStats:
        stats = self._writer.stats()
        if self._pg_writer is not None:
            pg = self._pg_writer
            stats = dataclasses.replace(stats, conflicts=pg.conflicts, locked=pg.locked)
        return stats

    # ---------------------------------------------------------------- lifecycle

    def _make_reader_engine(self, size: int, overflow: int) -> AsyncEngine:
        if self._sqlite:
            engine = create_async_engine(self.url, pool_size=size, max_overflow=0)
            _sqlite_reader_setup(engine.sync_engine)
            return engine
        connect_args: dict[str, Any] = {"timeout": _PG_CONNECT_TIMEOUT_S}
        if self._statement_cache_size is not None:
            connect_args["statement_cache_size"] = self._statement_cache_size
        if self._statement_cache_size == 0:  # PgBouncer: see the module docstring
            connect_args["prepared_statement_cache_size"] = 0
            connect_args["prepared_statement_name_func"] = _unique_statement_name
        return create_async_engine(
            self.url,
            pool_size=size,
            max_overflow=overflow,
            pool_pre_ping=True,
            connect_args=connect_args,
        )

    async def open(self) -> None:
        """Connect and start the group-commit writer. Migrations are separate.

        Raises StorageUnavailable when the database does not answer.
        """
        if self._writer.started:
            return
        if self._sqlite and sqlite3.sqlite_version_info < _SQLITE_MIN:
            raise StorageUnavailable(
                f"chatd needs SQLite {'.'.join(map(str, _SQLITE_MIN))} or newer "
                f"(UPDATE ... FROM); this Python has {sqlite3.sqlite_version}"
            )
        size = max(1, self.pool_size)
        self._reads.engine = self._make_reader_engine(size, size)
        self._reads.ping_engine = self._make_reader_engine(1, 0)
        if self._sqlite:
            self._sqlite_exec = ThreadPoolExecutor(1, thread_name_prefix="chatd-sqlite-writer")
        else:
            cache = self._statement_cache_size
            self._pg_writer = PgBatchWriter(
                asyncpg_dsn(self.url), statement_cache_size=100 if cache is None else cache
            )
        try:
            await self.ping()
        except StorageUnavailable:
            await self._dispose()
            raise
        self._writer.start()

    async def close(self) -> None:
        """Finish (or fail with StorageUnavailable) every queued write, then disconnect."""
        await self._writer.stop()
        await self._dispose()

    async def _dispose(self) -> None:
        engines = (self._reads.engine, self._reads.ping_engine)
        self._reads.engine = self._reads.ping_engine = None
        for engine in engines:
            if engine is not None:
                with contextlib.suppress(Exception):
                    await engine.dispose()
        pg_writer, self._pg_writer = self._pg_writer, None
        if pg_writer is not None:
            await pg_writer.close()
        pool, self._sqlite_exec = self._sqlite_exec, None
        if pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(pool, self._close_sqlite_conn)
            pool.shutdown(wait=True)

    # ------------------------------------------------------------------- writes

    def send(
        self, sender: str, recipient: str, cmid: str, body: str | bytes, type: str, ts: int
    ) -> asyncio.Future[SendOutcome]:
        """Store a message durably, once per (sender, cmid) (see `Store.send`): queued at
        once, the future ends when it is committed. A repeated (sender, cmid) is a dup
        also when both are in one batch. If the caller stops waiting, the message may
        still be stored (a retry is a dup)."""
        fut: asyncio.Future[SendOutcome] = asyncio.get_running_loop().create_future()
        self._writer.submit(SendOp(sender, recipient, cmid, body, type, ts, fut))
        return fut

    def mark(
        self, user: str, conv: str, kind: MarkKind, upto: int, ts: int
    ) -> asyncio.Future[MarkOutcome]:
        """Move `user`'s watermark of `kind` in `conv` forward, durably (see `Store.mark`).

        NotAMember also covers a conversation that does not exist (yet).
        """
        if kind not in ("delivered", "read"):
            raise ValueError(f"bad mark kind: {kind!r}")
        fut: asyncio.Future[MarkOutcome] = asyncio.get_running_loop().create_future()
        self._writer.submit(MarkOp(user, conv, kind, upto, ts, fut))
        return fut

    async def _commit_batch(self, batch: Sequence[Op]) -> list[object]:
        """One transaction for the batch (the writer's `commit`). SQLite: the whole
        transaction in one hop to the writer thread, on its own stdlib sqlite3
        connection. PostgreSQL: the same plan around server-side functions on the
        writer's asyncpg connection (`storage.batch_pg`)."""
        if self._sqlite:
            if self._sqlite_exec is None:
                raise StorageUnavailable("store is not open")
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._sqlite_exec, self._commit_batch_sync, batch)
        pg_writer = self._pg_writer
        if pg_writer is None:
            raise StorageUnavailable("store is not open")
        return await pg_writer.commit(batch)

    def _commit_batch_sync(self, batch: Sequence[Op]) -> list[object]:
        """Runs on the SQLite writer thread (the only user of `_sqlite_conn`)."""
        conn = self._sqlite_conn
        if conn is None:
            path = sqlite_path(self.url)
            assert path is not None
            conn = self._sqlite_conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False
            )
            _sqlite_pragmas(conn)
        cache = self._sqlite_cache
        conn.execute("BEGIN IMMEDIATE")
        try:
            cache.begin(conn.execute("PRAGMA data_version").fetchone()[0])
            results = apply_batch(SqliteIO(conn, cache), batch)
            conn.execute("COMMIT")
        except BaseException:
            cache.clear()  # whatever the failure: read every row again
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        cache.commit()
        return results

    def _close_sqlite_conn(self) -> None:
        conn, self._sqlite_conn = self._sqlite_conn, None
        self._sqlite_cache.clear()
        if conn is not None:
            conn.close()

    # -------------------------------------------------------------------- reads

    async def find_sent(self, sender: str, cmid: str) -> SendOutcome | None:
        """The stored message of (sender, cmid) as a dup outcome, or None."""
        return await self._reads.find_sent(sender, cmid)

    async def last_cur(self, user: str) -> int:
        """The newest `cur` of the user's stream (0 for a user with no events)."""
        return await self._reads.last_cur(user)

    async def last_curs(self, users: Sequence[str]) -> dict[str, int]:
        """`last_cur` of many users in one query (users with no events left out)."""
        return await self._reads.last_curs(users)

    async def events(self, user: str, after: int, upto: int, limit: int) -> list[Event]:
        """Events of `user` with after < cur <= upto, in cur order, at most `limit`."""
        return await self._reads.events(user, after, upto, limit)

    async def undelivered(self, user: str, after: int, upto: int, limit: int) -> list[Event]:
        """`msg` events of messages *to* `user` with after < cur <= upto whose seq is
        above the user's delivered watermark of their conversation, in cur order,
        at most `limit`."""
        return await self._reads.undelivered(user, after, upto, limit)

    async def history(self, user: str, peer: str, before: int | None, limit: int) -> HistoryPage:
        """Messages between user and peer with seq < before (None: newest), newest first.

        `more` says older ones exist; `delivered` / `read` are the peer's
        watermarks (0 when the conversation does not exist).
        """
        return await self._reads.history(user, peer, before, limit)

    async def convs(self, user: str, limit: int) -> list[ConvSummary]:
        """The user's conversations, newest last message first (tie: stored later first)."""
        return await self._reads.convs(user, limit)

    async def ping(self) -> None:
        """Raise StorageUnavailable unless the database answers (health checks)."""
        await self._reads.ping()
