"""Two OS processes, each with its own SqlStore on one PostgreSQL database, hammer the same
ten conversations from both sides (tests/storage/stress_worker.py); then every invariant
is checked over the stored rows. Meanwhile this process reads the streams and checks
that no `cur` is ever visible before a lower one (commit order)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from storage.sql import SqlStore
from tests.conftest import asyncpg_dsn
from tests.storage.stress_worker import USERS

ROUNDS = 40
ROOT = Path(__file__).resolve().parents[2]


async def _start(url: str, side: str, writers: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.storage.stress_worker",
        url,
        side,
        str(ROUNDS),
        str(writers),
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )


async def _watch_streams(url: str, done: asyncio.Event) -> int:
    """Read every stream until `done`: each read of 1..last_cur must find every cur."""
    reads = 0
    store = SqlStore(url, pool_size=2)
    await store.open()
    try:
        for _ in range(100_000):  # bounded; ends with the workers
            if done.is_set():
                break
            for u in USERS:
                last = await store.last_cur(u)
                curs = [e.cur for e in await store.events(u, 0, last, 1_000_000)]
                assert curs == list(range(1, last + 1)), f"{u}: a cur visible before a lower one"
                reads += 1
    finally:
        await store.close()
    return reads


@pytest.mark.parametrize("writers", [1, 2])
async def test_two_processes_on_one_database(pg_url: str, writers: int) -> None:
    """writers=2: each process also commits two batches at once (two connections)."""
    procs = [await _start(pg_url, side, writers) for side in ("left", "right")]
    done = asyncio.Event()
    try:
        async with asyncio.timeout(60):
            for p in procs:
                assert p.stdout is not None
                assert (await p.stdout.readline()).strip() == b"ready"
            watcher = asyncio.create_task(_watch_streams(pg_url, done))
            for p in procs:
                assert p.stdin is not None
                p.stdin.write(b"go\n")
                await p.stdin.drain()
            outputs = [await p.communicate() for p in procs]
            done.set()
            assert await watcher > 0
    finally:
        done.set()
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    assert [p.returncode for p in procs] == [0, 0]
    results = [r for out, _err in outputs for r in json.loads(out.splitlines()[-1])]
    conn = await asyncpg.connect(asyncpg_dsn(pg_url))
    try:
        await _check_rows(conn, results)
    finally:
        await conn.close()


async def _check_rows(conn: asyncpg.Connection, results: list[dict[str, Any]]) -> None:
    messages = await conn.fetch("SELECT * FROM messages")
    events = await conn.fetch("SELECT * FROM events ORDER BY user_id, cur")
    # seq per conversation: 1..n, no gap, no duplicate; the convs row agrees.
    seqs: dict[str, list[int]] = defaultdict(list)
    for m in messages:
        seqs[m["conv"]].append(m["seq"])
    assert len(seqs) == 10
    last_seq = dict(await conn.fetch("SELECT conv, last_seq FROM convs"))
    for conv, ss in seqs.items():
        assert sorted(ss) == list(range(1, len(ss) + 1)) and last_seq[conv] == len(ss)
    # one row per (sender, cmid); every acknowledged send is that row.
    by_key = {(m["sender"], m["cmid"]): m for m in messages}
    assert len(by_key) == len(messages) == 2 * ROUNDS * 10 + 10
    firsts: dict[tuple[str, str], int] = defaultdict(int)
    for r in results:
        s = r["send"]
        m = by_key[(s["sender"], s["cmid"])]
        assert (m["mid"], m["seq"], m["sender_cur"], m["recipient_cur"]) == (
            s["mid"],
            s["seq"],
            s["sender_cur"],
            s["recipient_cur"],
        )
        firsts[(s["sender"], s["cmid"])] += not s["dup"]
    assert set(firsts.values()) == {1}  # the shared ones: one side stored, one got a dup
    _check_streams(events, by_key)
    await _check_watermarks(conn, events)


def _check_streams(events: list[asyncpg.Record], by_key: dict[Any, asyncpg.Record]) -> None:
    """cur per user 1..n; a message's curs are its events; in each stream the messages
    of one conversation come in seq order (cur order is commit order)."""
    by_mid = {m["mid"]: m for m in by_key.values()}
    streams: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for e in events:
        streams[e["user_id"]].append(e)
    for user, evs in streams.items():
        assert [e["cur"] for e in evs] == list(range(1, len(evs) + 1))
        last: dict[str, int] = {}
        for e in evs:
            if e["kind"] != "msg":
                continue
            m = by_mid[e["mid"]]
            assert e["cur"] == (m["sender_cur"] if m["sender"] == user else m["recipient_cur"])
            assert m["seq"] > last.get(m["conv"], 0)
            last[m["conv"]] = m["seq"]
    assert sum(e["kind"] == "msg" for e in events) == 2 * len(by_key)


async def _check_watermarks(conn: asyncpg.Connection, events: list[asyncpg.Record]) -> None:
    """Receipts only move forward; the members rows hold the last of them and an unread
    count that matches the messages."""
    seen: dict[tuple[str, str, str, str], int] = {}
    for e in events:  # in cur order per stream
        if e["kind"] == "msg":
            continue
        key = (e["user_id"], e["conv"], e["kind"], e["by_user"])
        assert e["upto"] > seen.get(key, 0)
        seen[key] = e["upto"]
    rows = await conn.fetch(
        "SELECT mb.*, (SELECT count(*) FROM messages m WHERE m.conv = mb.conv"
        " AND m.recipient = mb.user_id AND m.seq > mb.read) AS counted FROM members mb"
    )
    assert len(rows) == 20
    for mb in rows:
        assert mb["read"] <= mb["delivered"] <= mb["last_recv_seq"]
        assert mb["unread"] == mb["counted"]
        own = [
            v for (u, c, _k, by), v in seen.items() if u == by == mb["user_id"] and c == mb["conv"]
        ]
        assert mb["delivered"] == max(own, default=0)
