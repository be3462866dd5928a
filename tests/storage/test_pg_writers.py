"""PostgreSQL with several writer connections (`SqlStore(writers=N)`): batches commit at
once, each on its own connection; the row locks keep every invariant. The contract cases
again, and a close that is cancelled while batches are in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import pytest

from storage.base import SendOutcome, StorageUnavailable, Store
from storage.batch_pg import Way
from storage.ops import Op
from storage.sql import SqlStore
from tests.storage.helpers import TS, all_events, assert_contiguous, run_case
from tests.storage.test_pgbouncer import CONTRACT


@pytest.mark.parametrize("case", CONTRACT, ids=lambda f: f.__name__.removeprefix("test_"))
async def test_contract_with_three_writers(
    pg_url: str, case: Callable[[Store], Awaitable[None]]
) -> None:
    await run_case(case, pg_url, writers=3)


async def test_batches_overlap_and_every_stream_stays_gap_free(pg_url: str) -> None:
    store = SqlStore(pg_url, writers=3, max_batch=4)
    await store.open()
    commit = store._writer.commit
    active: list[int] = []

    async def counted(batch: Sequence[Op]) -> list[object]:
        active.append(1)
        peak.append(len(active))
        try:
            return await commit(batch)
        finally:
            active.pop()

    peak: list[int] = []
    store._writer.commit = counted
    try:
        users = [f"u{i}" for i in range(8)]
        outs = await asyncio.gather(
            *(
                store.send(users[i % 8], users[(i * 3 + 1) % 8], f"c{i}", "x", "text", TS)
                for i in range(400)
                if i % 8 != (i * 3 + 1) % 8
            )
        )
        assert max(peak) == 3  # three batches were committing at once
        for u in users:
            assert_contiguous([e.cur for e in await all_events(store, u)])
        assert all(isinstance(o, SendOutcome) and not o.dup for o in outs)
    finally:
        await store.close()


async def test_cancelled_close_answers_the_batches_in_flight(pg_url: str) -> None:
    store = SqlStore(pg_url, writers=2, max_batch=2)
    await store.open()
    futs = [store.send("a", "b", f"c{i}", "x", "text", TS) for i in range(40)]
    closing = asyncio.ensure_future(store.close())
    await asyncio.sleep(0)
    closing.cancel()
    await asyncio.gather(closing, return_exceptions=True)
    async with asyncio.timeout(10):
        results = await asyncio.gather(*futs, return_exceptions=True)
    assert all(isinstance(r, SendOutcome | StorageUnavailable) for r in results)
    await store.close()


async def test_two_nodes_writing_for_the_same_people_keep_every_invariant(pg_url: str) -> None:
    """Two stores on one database (two nodes), each with two writers, sending between
    the same people at once: their checked writes conflict (and are done again, locked),
    and every stream stays gap free, every conversation's seq too, nothing twice. New
    people and conversations are created apart from any lock: no deadlock (no retry)."""
    nodes = [SqlStore(pg_url, writers=2, max_batch=8) for _ in range(2)]
    for node in nodes:
        await node.open()
    try:
        users = [f"u{i}" for i in range(6)]
        sends = 0
        for rnd in range(10):  # until the conflict path has been taken (bounded)
            outs = await asyncio.gather(
                *(
                    nodes[i % 2].send(
                        users[i % 6], users[(i + 1 + i // 6) % 6], f"r{rnd}c{i}", "x", "text", TS
                    )
                    for i in range(300)
                    if i % 6 != (i + 1 + i // 6) % 6
                )
            )
            assert all(isinstance(o, SendOutcome) and not o.dup for o in outs)
            sends += len(outs)
            if sum(n.stats().conflicts for n in nodes) > 0:
                break
        assert sum(n.stats().conflicts for n in nodes) > 0
        assert sum(n.stats().retries for n in nodes) == 0  # no deadlock, no lost race
        events = 0
        for u in users:
            curs = [e.cur for e in await all_events(nodes[0], u)]
            assert_contiguous(curs)
            events += len(curs)
        assert events == 2 * sends  # each message once in its sender's and recipient's
        for a in users:
            for b in users:
                if a < b:
                    page = await nodes[1].history(a, b, None, 200)
                    seqs = sorted(m.seq for m in page.messages)
                    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else True
    finally:
        for node in nodes:
            await node.close()


def test_the_way_turns_locked_while_checked_writes_conflict_and_probes_back() -> None:
    way = Way(threshold=0.25, probe=5)
    assert way.checked()
    for _ in range(5):
        way.tried(conflict=True)  # 41 % of recent checked writes conflicted
    assert [way.checked() for _ in range(10)] == ([False] * 4 + [True]) * 2  # probes
    for _ in range(20):
        way.tried(conflict=False)  # the probes pass: conflicts have become rare
    assert way.checked() and way.checked()


async def test_batches_go_the_locked_way_while_checked_writes_conflict(pg_url: str) -> None:
    store = SqlStore(pg_url)
    await store.open()
    try:
        writer = store._pg_writer
        assert writer is not None
        writer.way.rate = 1.0  # as after a run of conflicts
        out = await store.send("alice", "bob", "c1", "x", "text", TS)
        assert isinstance(out, SendOutcome) and out.message.seq == 1
        assert (store.stats().locked, store.stats().conflicts) == (1, 0)
    finally:
        await store.close()
