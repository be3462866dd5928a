"""What is particular to `SqlStore`, on SQLite and PostgreSQL: its group-commit options
(`group_commit`, `commit_window`), its writer's internals (the queue, the commit of a
batch) and the SQLite writer's cache. These tests are typed to `SqlStore` on purpose;
the `Store` contract is in test_store_contract.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from storage.base import StorageUnavailable
from storage.batch_io import SqliteIO
from storage.migrate import upgrade_async
from storage.sql import SqlStore
from storage.urls import asyncpg_dsn, normalize_url
from tests.storage.helpers import TS, all_events, assert_contiguous, send


async def test_group_commit_off(store_url: str) -> None:
    s = SqlStore(store_url, group_commit=False)
    await s.open()
    try:
        outs = await asyncio.gather(*(send(s, "alice", "bob", f"c{i}") for i in range(20)))
        assert sorted(o.message.seq for o in outs) == list(range(1, 21))
        assert s.batches == 20
        assert_contiguous([e.cur for e in await all_events(s, "bob")])
    finally:
        await s.close()


async def test_commit_window_paces_transactions(store_url: str) -> None:
    """A write that finds the writer idle commits at once, whatever the window; writes
    that arrive while a window runs share the next transaction."""
    idle = SqlStore(store_url, commit_window=60.0)
    await idle.open()
    try:
        async with asyncio.timeout(10):  # a delay of a whole window would time out
            await send(idle, "alice", "bob", "m1")
    finally:
        await idle.close()

    s = SqlStore(store_url, commit_window=1.0)
    await s.open()
    try:
        await send(s, "alice", "bob", "m2")  # opens a window
        batches = s.batches
        first = asyncio.ensure_future(send(s, "alice", "bob", "m3"))
        await s.last_cur("alice")  # a read round trip while m3 waits for the window
        second = asyncio.ensure_future(send(s, "bob", "alice", "m4"))
        outs = await asyncio.gather(first, second)
    finally:
        await s.close()
    assert [o.message.seq for o in outs] == [3, 4]  # after m1, m2
    assert s.batches == batches + 1  # one transaction for both


async def test_write_after_an_idle_window_commits_at_once(store_url: str) -> None:
    """Not only the store's first write: any write that finds the writer idle for a
    whole window. (The idle time is what is tested, so this test sleeps through it.)"""
    s = SqlStore(store_url, commit_window=1.0)
    await s.open()
    try:
        await send(s, "alice", "bob", "m1")
        await asyncio.sleep(1.05)
        async with asyncio.timeout(0.8):  # a wait for a window would take 1 s
            await send(s, "alice", "bob", "m2")
    finally:
        await s.close()


async def test_close_cancelled_while_the_writer_waits_answers_every_write(
    store_url: str,
) -> None:
    """close() cancelled (a shutdown timeout) while the writer holds a write and waits
    for its window: that write and the queued ones are answered, none hangs."""
    s = SqlStore(store_url, commit_window=60.0)
    await s.open()
    await send(s, "alice", "bob", "m1")  # opens a window
    held = s.send("alice", "bob", "m2", "hi", "text", TS)
    await asyncio.sleep(0)  # the writer takes it (its wake-up was scheduled first)
    assert s._writer.queue.qsize() == 0
    closing = asyncio.ensure_future(s.close())
    await asyncio.sleep(0)  # close() now waits for the writer
    closing.cancel()
    await asyncio.gather(closing, return_exceptions=True)
    async with asyncio.timeout(5):
        with pytest.raises(StorageUnavailable):
            await held
    with pytest.raises(StorageUnavailable):
        s.send("alice", "bob", "m3", "hi", "text", TS)  # the writer is gone
    await s.close()


async def test_an_outage_while_writes_are_retried_one_by_one_fails_the_rest_at_once(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a refused value, the writes are committed one per transaction; if the
    database then fails, the rest fail at once (one timeout, not one per write)."""
    calls: list[int] = []

    async def failing(batch: Any) -> list[object]:
        calls.append(len(batch))
        if len(batch) > 1:
            raise OverflowError("a value the driver refuses")
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store._writer, "commit", failing)
    results = await asyncio.gather(
        *(send(store, "alice", "bob", f"m{i}") for i in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, StorageUnavailable) for r in results)
    assert calls == [5, 1]


async def test_sqlite_writer_cache_holds_only_committed_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SQLite writer keeps counters between batches: a failed batch leaves nothing
    of its own in that cache, and a cache smaller than the data starts over correctly."""
    url = normalize_url(str(tmp_path / "cache.db"))
    await upgrade_async(url)
    s = SqlStore(url)
    s._sqlite_cache.max_rows = 3
    await s.open()
    try:
        for i in range(5):  # more users and conversations than the cache holds
            await send(s, f"u{i}", "hub", f"a{i}")
        real = SqliteIO.update_members

        def failing(self: SqliteIO, rows: Any) -> None:  # after the counters were written
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(SqliteIO, "update_members", failing)
        with pytest.raises(StorageUnavailable):
            await send(s, "u0", "hub", "lost")  # counters moved in memory, then rolled back
        monkeypatch.setattr(SqliteIO, "update_members", real)
        out = await send(s, "u0", "hub", "kept")
        assert (out.message.seq, out.sender_cur, out.recipient_cur) == (2, 2, 6)
        mark = await s.mark("hub", out.message.conv, "read", 2, TS)
        assert mark.marker_cur == 7 and mark.peer_cur == 3
        assert_contiguous([e.cur for e in await all_events(s, "hub")])
        assert [c.unread for c in await s.convs("hub", 10) if c.peer == "u0"] == [0]
    finally:
        await s.close()


async def test_postgres_batches_commit_durably_whatever_the_default(pg_url: str) -> None:
    """`sent` means durable: the batch's write function turns synchronous_commit on for its
    own transaction, also where the database's default is off."""
    conn = await asyncpg.connect(asyncpg_dsn(pg_url))
    try:
        await conn.execute("SET synchronous_commit = off")
        async with conn.transaction():
            await conn.execute("SELECT chatd_batch_write(" + ", ".join(["'{}'"] * 34) + ")")
            assert await conn.fetchval("SHOW synchronous_commit") == "on"
        assert await conn.fetchval("SHOW synchronous_commit") == "off"  # its own only
    finally:
        await conn.close()


async def test_convs_reads_an_index_range_not_a_sort(store_url: str) -> None:
    """`convs limit:500` for a user with many conversations walks the member activity
    index (user, last_ts, last_mid) newest first: no sort of all of them."""
    s = SqlStore(store_url)
    await s.open()
    try:
        for i in range(30):  # real conversations, through the writer (the trigger's path)
            await send(s, "mallory", f"peer{i:03}", f"c{i}")
        await send(s, "peer005", "mallory", "back")  # peer005 is now the newest
        convs = await s.convs("mallory", 500)
        assert [c.peer for c in convs[:2]] == ["peer005", "peer029"]
        assert len(convs) == 30
        plan = await _explain_convs(s, "mallory")
    finally:
        await s.close()
    assert "ix_members_user_id_last_ts_last_mid" in plan, plan
    assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan


async def _explain_convs(s: SqlStore, user: str) -> str:
    from storage.reads import _convs_query

    engine = s._reads.engine
    assert engine is not None
    query = _convs_query(user, 500).compile(engine, compile_kwargs={"literal_binds": True})
    async with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {query}")
            return "\n".join(str(r[-1]) for r in rows)
        await conn.exec_driver_sql("SET enable_seqscan = off")  # a small table: as if big
        rows = await conn.exec_driver_sql(f"EXPLAIN {query}")
        return "\n".join(str(r[0]) for r in rows)
