"""The Store contract, run against every implementation (SQLite and PostgreSQL).

The tests use the `Store` interface only; `SqlStore` is built where a test opens
stores of its own. What is particular to `SqlStore` (its group-commit options,
its writer's internals, the SQLite writer's cache) is in test_sql_store.py.
Tests synchronise on awaits (futures of committed writes), never on sleeps.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import asyncpg
import pytest

from storage.base import (
    NotAMember,
    SendOutcome,
    StorageRejected,
    StorageUnavailable,
    Store,
    UptoTooHigh,
    conv_id,
)
from storage.migrate import current_revision_async, head_revision, upgrade_async
from storage.sql import SqlStore
from storage.urls import normalize_url, sqlite_path
from tests.conftest import asyncpg_dsn
from tests.storage.helpers import TS, all_events, assert_contiguous, send

# ------------------------------------------------------------------ seq and cur


async def test_seq_per_conversation_and_curs(store: Store) -> None:
    outs = [
        await send(store, "alice", "bob", "m1"),
        await send(store, "bob", "alice", "m2"),
        await send(store, "alice", "bob", "m3"),
        await send(store, "alice", "carol", "m4"),
    ]
    ab = conv_id("alice", "bob")
    assert [o.message.seq for o in outs[:3]] == [1, 2, 3]
    assert all(o.message.conv == ab for o in outs[:3])
    assert outs[3].message.seq == 1 and outs[3].message.conv == conv_id("carol", "alice")
    assert [o.dup for o in outs] == [False] * 4
    mids = [o.message.mid for o in outs]
    assert mids == sorted(mids) and len(set(mids)) == 4
    # alice: m1 m2 m3 m4 -> 1..4; bob: m1 m2 m3 -> 1..3; carol: m4 -> 1
    assert [o.sender_cur for o in outs] == [1, 2, 3, 4]
    assert [o.recipient_cur for o in outs] == [1, 2, 3, 1]
    assert await store.last_cur("alice") == 4
    assert await store.last_cur("bob") == 3
    assert await store.last_cur("nobody") == 0


async def test_concurrent_sends_no_gaps(store: Store) -> None:
    users = [f"u{i}" for i in range(6)]
    jobs = []
    for i in range(200):
        a = users[i % 6]
        b = users[(i * 7 + 1) % 6]
        if a == b:
            b = users[(i + 1) % 6]
        jobs.append(store.send(a, b, f"c{i}", f"body {i}", "text", TS + i))
    outs = await asyncio.gather(*jobs)
    assert not any(o.dup for o in outs)
    assert store.stats().batches < 200  # they shared transactions

    by_conv: dict[str, list[int]] = defaultdict(list)
    for o in outs:
        by_conv[o.message.conv].append(o.message.seq)
    for seqs in by_conv.values():
        assert sorted(seqs) == list(range(1, len(seqs) + 1))

    mids_seen: dict[str, list[int]] = defaultdict(list)
    for u in users:
        evs = await all_events(store, u)
        assert_contiguous([e.cur for e in evs])
        for e in evs:
            assert e.message is not None
            mids_seen[u].append(e.message.mid)
        assert len(set(mids_seen[u])) == len(mids_seen[u])
    for o in outs:
        m = o.message
        assert m.mid in mids_seen[m.sender] and m.mid in mids_seen[m.recipient]
        # cur order = commit order: seq order within a conversation matches cur order.
    for u in users:
        evs = await all_events(store, u)
        last: dict[str, int] = {}
        for e in evs:
            assert e.message is not None
            assert e.message.seq > last.get(e.message.conv, 0)
            last[e.message.conv] = e.message.seq


async def test_two_stores_on_one_database(store_url: str) -> None:
    """Two writers on one database (PostgreSQL: two nodes; SQLite: the SQLite writer's
    cached counters must notice the other's commits)."""
    s1, s2 = SqlStore(store_url, max_batch=16), SqlStore(store_url, max_batch=16)
    await s1.open()
    await s2.open()
    try:
        jobs = []
        for i in range(150):
            st = s1 if i % 2 else s2
            a, b = ("alice", "bob") if i % 3 else ("bob", "alice")
            jobs.append(st.send(a, b, f"c{i}", f"b{i}", "text", TS + i))
            if i % 10 == 0:
                jobs.append(st.send("alice", "carol", f"x{i}", "x", "text", TS + i))
        outs = await asyncio.gather(*jobs)
        ab = [o.message.seq for o in outs if o.message.conv == conv_id("alice", "bob")]
        assert sorted(ab) == list(range(1, 151))
        for u in ("alice", "bob", "carol"):
            evs = await all_events(s1, u)
            assert_contiguous([e.cur for e in evs])
            seqs = [
                e.message.seq for e in evs if e.message and e.message.conv == outs[0].message.conv
            ]
            assert seqs == sorted(seqs)
        assert len(await all_events(s2, "alice")) == 150 + 15
    finally:
        await s1.close()
        await s2.close()


# ---------------------------------------------------------------------- dedupe


async def test_cmid_dedupe(store: Store) -> None:
    first = await send(store, "alice", "bob", "same", "original")
    cur_a, cur_b = await store.last_cur("alice"), await store.last_cur("bob")
    again = await store.send("alice", "carol", "same", b"other", "image", TS + 5)
    assert again.dup
    assert again.message == first.message
    assert (again.sender_cur, again.recipient_cur) == (first.sender_cur, first.recipient_cur)
    assert await store.last_cur("alice") == cur_a
    assert await store.last_cur("bob") == cur_b
    assert await store.last_cur("carol") == 0
    assert await store.convs("carol", 10) == []
    found = await store.find_sent("alice", "same")
    assert found == again
    assert await store.find_sent("alice", "nope") is None
    # another sender may reuse the cmid
    other = await send(store, "bob", "alice", "same")
    assert not other.dup and other.message.seq == 2


async def test_cmid_dedupe_inside_one_batch(store: Store) -> None:
    a, b, c = await asyncio.gather(
        send(store, "alice", "bob", "k", "one"),
        send(store, "alice", "dave", "k", "two"),
        send(store, "alice", "bob", "k2", "three"),
    )
    assert not a.dup and b.dup and not c.dup
    assert b.message == a.message and b.sender_cur == a.sender_cur
    assert c.message.seq == 2
    page = await store.history("alice", "bob", None, 10)
    assert [m.cmid for m in page.messages] == ["k2", "k"]
    assert await store.last_cur("dave") == 0


# ------------------------------------------------------------------ watermarks


async def test_watermarks_only_move_forward(store: Store) -> None:
    for i in range(3):
        await send(store, "alice", "bob", f"m{i}")
    conv = conv_id("alice", "bob")
    out = await store.mark("bob", conv, "delivered", 2, TS + 1)
    assert out.receipt is not None
    assert (out.receipt.kind, out.receipt.upto, out.receipt.by) == ("delivered", 2, "bob")
    assert out.peer == "alice" and out.marker_cur == 4 and out.peer_cur == 4
    before = (await store.last_cur("alice"), await store.last_cur("bob"))
    assert out.watermark == 2
    for upto in (2, 1, 0):
        same = await store.mark("bob", conv, "delivered", upto, TS + 2)
        assert same.receipt is None and same.marker_cur == 0 and same.peer_cur == 0
        assert same.peer == "alice" and same.watermark == 2  # what is committed
    assert (await store.last_cur("alice"), await store.last_cur("bob")) == before
    moved = await store.mark("bob", conv, "delivered", 3, TS + 3)
    assert moved.receipt is not None and moved.receipt.upto == 3 and moved.watermark == 3


async def test_mark_capped_at_last_message_to_user(store: Store) -> None:
    await send(store, "alice", "bob", "m1")
    await send(store, "alice", "bob", "m2")
    await send(store, "bob", "alice", "m3")  # seq 3 is bob's own
    conv = conv_id("alice", "bob")
    out = await store.mark("bob", conv, "read", 3, TS)
    assert out.receipt is not None and out.receipt.upto == 2 and out.watermark == 2
    again = await store.mark("bob", conv, "read", 3, TS)
    assert again.receipt is None and again.watermark == 2  # capped: below `upto`
    # a user who received nothing yet cannot move a watermark
    await send(store, "carol", "dave", "c1")
    nothing = await store.mark("carol", conv_id("carol", "dave"), "read", 1, TS)
    assert nothing.receipt is None and nothing.peer == "dave"
    assert await store.last_cur("carol") == 1


async def test_upto_too_high_and_not_a_member(store: Store) -> None:
    await send(store, "alice", "bob", "m1")
    conv = conv_id("alice", "bob")
    with pytest.raises(UptoTooHigh):
        await store.mark("bob", conv, "delivered", 2, TS)
    with pytest.raises(NotAMember):
        await store.mark("carol", conv, "delivered", 1, TS)
    with pytest.raises(NotAMember):
        await store.mark("bob", "no-such-conv", "read", 1, TS)
    with pytest.raises(NotAMember):
        await store.mark("bob", conv_id("bob", "zed"), "read", 0, TS)


async def test_read_implies_delivered_single_event(store: Store) -> None:
    await send(store, "alice", "bob", "m1")
    await send(store, "alice", "bob", "m2")
    conv = conv_id("alice", "bob")
    out = await store.mark("bob", conv, "read", 2, TS + 9)
    assert out.receipt is not None and out.receipt.kind == "read"
    for user, cur in (("bob", out.marker_cur), ("alice", out.peer_cur)):
        evs = await all_events(store, user)
        assert [e.cur for e in evs] == [1, 2, 3] and cur == 3
        receipts = [e.receipt for e in evs if e.receipt is not None]
        assert len(receipts) == 1
        r = receipts[0]
        assert (r.conv, r.kind, r.upto, r.by, r.ts) == (conv, "read", 2, "bob", TS + 9)
    assert (await store.mark("bob", conv, "delivered", 2, TS)).receipt is None
    page = await store.history("alice", "bob", None, 10)
    assert (page.delivered, page.read) == (2, 2)


# ---------------------------------------------------------------------- reads


async def test_events_range_and_limit(store: Store) -> None:
    for i in range(5):
        await send(store, "alice", "bob", f"m{i}")
    await store.mark("bob", conv_id("alice", "bob"), "delivered", 5, TS)
    evs = await store.events("alice", 0, 100, 100)
    assert [e.cur for e in evs] == [1, 2, 3, 4, 5, 6]
    assert evs[5].receipt is not None and evs[5].message is None
    assert all(e.user == "alice" for e in evs)
    assert [e.cur for e in await store.events("alice", 2, 4, 100)] == [3, 4]
    assert [e.cur for e in await store.events("alice", 1, 6, 2)] == [2, 3]
    assert await store.events("alice", 6, 100, 10) == []
    assert await store.events("nobody", 0, 100, 10) == []


async def test_undelivered(store: Store) -> None:
    await send(store, "alice", "bob", "a1")
    await send(store, "bob", "alice", "b1")  # own message: excluded for bob
    await send(store, "alice", "bob", "a2")
    await send(store, "alice", "bob", "a3")
    await send(store, "carol", "bob", "c1")
    ab = conv_id("alice", "bob")
    await store.mark("bob", ab, "delivered", 3, TS)  # a1, a2 delivered; receipt excluded
    upto = await store.last_cur("bob")
    evs = await store.undelivered("bob", 0, upto, 100)
    assert [e.message.cmid for e in evs if e.message] == ["a3", "c1"]
    assert all(e.receipt is None for e in evs)
    curs = [e.cur for e in evs]
    assert curs == sorted(curs)
    assert len(await store.undelivered("bob", 0, upto, 1)) == 1
    assert await store.undelivered("bob", 0, curs[0] - 1, 100) == []


async def test_history_paging(store: Store) -> None:
    for i in range(1, 8):
        a, b = ("alice", "bob") if i % 2 else ("bob", "alice")
        await send(store, a, b, f"m{i}")
    await store.mark("bob", conv_id("alice", "bob"), "read", 5, TS)
    p1 = await store.history("alice", "bob", None, 3)
    assert [m.seq for m in p1.messages] == [7, 6, 5] and p1.more
    assert p1.conv == conv_id("alice", "bob")
    assert (p1.delivered, p1.read) == (5, 5)  # bob's marks
    p2 = await store.history("alice", "bob", 5, 3)
    assert [m.seq for m in p2.messages] == [4, 3, 2] and p2.more
    p3 = await store.history("alice", "bob", 2, 3)
    assert [m.seq for m in p3.messages] == [1] and not p3.more
    exact = await store.history("bob", "alice", None, 7)
    assert len(exact.messages) == 7 and not exact.more
    assert (exact.delivered, exact.read) == (0, 0)  # alice never marked


async def test_history_of_empty_conversation(store: Store) -> None:
    page = await store.history("alice", "zoe", None, 50)
    assert page.conv == conv_id("alice", "zoe")
    assert list(page.messages) == [] and not page.more
    assert (page.delivered, page.read) == (0, 0)


async def test_convs_order_unread_and_peer_marks(store: Store) -> None:
    await store.send("bob", "alice", "1", "x", "text", TS + 1)
    await store.send("carol", "alice", "2", "x", "text", TS + 2)
    await store.send("bob", "alice", "3", "x", "text", TS + 3)
    await store.send("dave", "alice", "4", "x", "text", TS + 3)  # tie on ts: stored later first
    await store.send("alice", "dave", "5", "x", "text", TS + 3)
    cs = await store.convs("alice", 10)
    assert [c.peer for c in cs] == ["dave", "bob", "carol"]
    assert [c.unread for c in cs] == [1, 2, 1]
    assert [c.seq for c in cs] == [2, 2, 1]
    assert cs[0].ts == TS + 3 and cs[0].conv == conv_id("alice", "dave")
    assert await store.convs("alice", 2) == cs[:2]

    await store.mark("alice", conv_id("alice", "bob"), "read", 1, TS)
    cs = await store.convs("alice", 10)
    assert [c.unread for c in cs] == [1, 1, 1]
    await store.mark("alice", conv_id("alice", "bob"), "read", 2, TS)
    await store.mark("dave", conv_id("alice", "dave"), "delivered", 2, TS)
    cs = await store.convs("alice", 10)
    assert [c.unread for c in cs] == [1, 0, 1]
    assert (cs[0].delivered, cs[0].read) == (2, 0)  # dave's marks as seen by alice
    bob_view = await store.convs("bob", 10)
    assert len(bob_view) == 1 and bob_view[0].unread == 0
    assert (bob_view[0].delivered, bob_view[0].read) == (2, 2)  # alice's marks
    assert await store.convs("nobody", 10) == []


async def test_unread_with_marks_and_sends_in_one_batch(store: Store) -> None:
    await send(store, "alice", "bob", "1")
    await send(store, "alice", "bob", "2")
    conv = conv_id("alice", "bob")
    await asyncio.gather(
        store.mark("bob", conv, "read", 2, TS),
        send(store, "alice", "bob", "3"),
        send(store, "alice", "bob", "4"),
    )
    (c,) = await store.convs("bob", 10)
    assert c.unread == 2 and c.seq == 4


async def test_body_round_trip(store: Store) -> None:
    bodies: list[str | bytes] = ["héllo ✓ 🙂", b"\x00\xff\x80binary", "", b""]
    outs = [await send(store, "alice", "bob", f"b{i}", body) for i, body in enumerate(bodies)]
    for o, body in zip(outs, bodies, strict=True):
        assert o.message.body == body and type(o.message.body) is type(body)
    page = await store.history("bob", "alice", None, 10)
    got = list(reversed([m.body for m in page.messages]))
    assert got == bodies and [type(g) for g in got] == [type(b) for b in bodies]
    evs = await all_events(store, "bob")
    assert [e.message.body for e in evs if e.message] == bodies
    found = await store.find_sent("alice", "b1")
    assert found is not None and found.message.body == b"\x00\xff\x80binary"


# ------------------------------------------------------------------ batching


async def test_failing_op_does_not_fail_its_batch(store: Store) -> None:
    await send(store, "alice", "bob", "m0")
    conv = conv_id("alice", "bob")
    batches = store.stats().batches
    results = await asyncio.gather(
        send(store, "alice", "bob", "m1"),
        store.mark("carol", conv, "read", 1, TS),
        store.mark("bob", conv, "read", 99, TS),
        store.mark("bob", conv_id("bob", "erin"), "read", 1, TS),  # conv created below
        send(store, "erin", "bob", "e1"),
        store.mark("bob", conv, "delivered", 2, TS),
        return_exceptions=True,
    )
    assert store.stats().batches == batches + 1
    assert isinstance(results[0], SendOutcome) and results[0].message.seq == 2
    assert isinstance(results[1], NotAMember)
    assert isinstance(results[2], UptoTooHigh)
    assert isinstance(results[3], NotAMember)
    assert isinstance(results[4], SendOutcome)
    mark = results[5]
    assert not isinstance(mark, BaseException)
    assert mark.receipt is not None and mark.receipt.upto == 2  # sees m1 of the same batch
    assert_contiguous([e.cur for e in await all_events(store, "bob")])


async def test_a_value_the_database_refuses_fails_only_its_own_op(store: Store) -> None:
    """One write the database refuses (here a `ts` over 64 bits: SQLite's driver and
    PostgreSQL both refuse it) fails alone, with StorageRejected; the writes that shared
    its transaction are stored in queue order, numbered as if it had never been sent."""
    await send(store, "alice", "bob", "m0")
    conv = conv_id("alice", "bob")
    results = await asyncio.gather(
        send(store, "alice", "bob", "m1"),
        store.send("bob", "alice", "bad", "x", "text", 2**70),
        store.mark("bob", conv, "read", 2, TS),
        send(store, "bob", "alice", "m2"),
        send(store, "alice", "bob", "m1"),  # a dup of the first, in the same batch
        return_exceptions=True,
    )
    m1, bad, mark, m2, dup = results
    assert isinstance(bad, StorageRejected)
    assert isinstance(m1, SendOutcome) and m1.message.seq == 2 and not m1.dup
    assert not isinstance(mark, BaseException)
    assert mark.receipt is not None and mark.receipt.upto == 2
    assert isinstance(m2, SendOutcome) and m2.message.seq == 3
    assert isinstance(dup, SendOutcome) and dup.dup and dup.message == m1.message
    assert await store.find_sent("bob", "bad") is None
    for user in ("alice", "bob"):
        assert_contiguous([e.cur for e in await all_events(store, user)])
    page = await store.history("alice", "bob", None, 10)
    assert [m.cmid for m in page.messages] == ["m2", "m1", "m0"]  # newest first
    again = await send(store, "bob", "alice", "m3")  # the writer goes on
    assert again.message.seq == 4


async def test_close_finishes_queued_writes(store_url: str) -> None:
    s = SqlStore(store_url)
    await s.open()
    *outs, _ = await asyncio.gather(
        *(send(s, "alice", "bob", f"c{i}") for i in range(30)), s.close()
    )
    assert len(outs) == 30 and all(isinstance(o, SendOutcome) for o in outs)
    with pytest.raises(StorageUnavailable):
        await send(s, "alice", "bob", "late")
    s2 = SqlStore(store_url)
    await s2.open()
    try:
        assert await s2.last_cur("bob") == 30
    finally:
        await s2.close()


async def test_data_survives_reopen(store_url: str) -> None:
    s = SqlStore(store_url)
    await s.open()
    first = await send(s, "alice", "bob", "m1", b"\x01")
    await s.mark("bob", first.message.conv, "read", 1, TS)
    await s.close()
    s = SqlStore(store_url)
    await s.open()
    try:
        assert await s.last_cur("bob") == 2
        assert await s.find_sent("alice", "m1") == SendOutcome(
            first.message, first.sender_cur, first.recipient_cur, dup=True
        )
        nxt = await send(s, "bob", "alice", "m2")
        assert nxt.message.seq == 2 and nxt.sender_cur == 3 and nxt.message.mid > first.message.mid
        page = await s.history("alice", "bob", None, 10)
        assert (page.delivered, page.read) == (1, 1)
    finally:
        await s.close()


async def test_two_stores_taking_turns(store_url: str) -> None:
    """Each store sees the other's commits (the SQLite writer's cached counters too)."""
    s1, s2 = SqlStore(store_url), SqlStore(store_url)
    await s1.open()
    await s2.open()
    try:
        for i in range(6):
            st = (s1, s2)[i % 2]
            out = await send(st, "alice", "bob", f"t{i}")
            # alice: her message and bob's receipt; bob: that message, his receipt, his send
            assert (out.message.seq, out.sender_cur, out.recipient_cur) == (
                i + 1,
                2 * i + 1,
                3 * i + 1,
            )
            mark = await st.mark("bob", out.message.conv, "delivered", i + 1, TS)
            assert mark.receipt is not None
            assert (mark.marker_cur, mark.peer_cur) == (3 * i + 2, 2 * i + 2)
            await send(s2 if st is s1 else s1, "bob", "carol", f"x{i}")
        assert_contiguous([e.cur for e in await all_events(s1, "bob")])
    finally:
        await s1.close()
        await s2.close()


# --------------------------------------------------------------- availability


async def test_unreachable_database_is_unavailable() -> None:
    s = SqlStore("postgresql://postgres@127.0.0.1:1/none")
    with pytest.raises(StorageUnavailable):
        await s.open()
    with pytest.raises(StorageUnavailable):
        await s.ping()
    with pytest.raises(StorageUnavailable):
        await send(s, "a", "b", "c")


async def test_writer_survives_a_lost_connection(pg_url: str, pg_admin_url: str) -> None:
    s = SqlStore(pg_url)
    await s.open()
    try:
        await send(s, "alice", "bob", "m1")
        name = pg_url.rsplit("/", 1)[1]
        admin = await asyncpg.connect(asyncpg_dsn(pg_admin_url))
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
            )
        finally:
            await admin.close()
        with pytest.raises(StorageUnavailable):
            await send(s, "alice", "bob", "m2")
        again = await send(s, "alice", "bob", "m2")  # nothing was stored the first time
        assert not again.dup and again.message.seq == 2
        await s.ping()
    finally:
        await s.close()


# ----------------------------------------------------------------- migrations


async def test_migrations_twice_are_a_no_op(store_url: str) -> None:
    assert await current_revision_async(store_url) == head_revision()
    await upgrade_async(store_url)
    await upgrade_async(store_url)
    assert await current_revision_async(store_url) == head_revision()


async def test_concurrent_upgrades_on_fresh_postgres(pg_empty_url: str) -> None:
    assert await current_revision_async(pg_empty_url) is None
    await asyncio.gather(upgrade_async(pg_empty_url), upgrade_async(pg_empty_url))
    assert await current_revision_async(pg_empty_url) == head_revision()
    s = SqlStore(pg_empty_url)
    await s.open()
    try:
        assert (await send(s, "a", "b", "c")).message.seq == 1
    finally:
        await s.close()


def test_url_normalisation() -> None:
    assert normalize_url("sqlite:///x.db") == "sqlite+aiosqlite:///x.db"
    assert normalize_url("sqlite+aiosqlite:////abs/x.db") == "sqlite+aiosqlite:////abs/x.db"
    assert normalize_url("chatd.db") == "sqlite+aiosqlite:///chatd.db"
    assert normalize_url("/var/lib/chatd.db") == "sqlite+aiosqlite:////var/lib/chatd.db"
    for u in ("postgres://u@h/d", "postgresql://u@h/d", "postgresql+asyncpg://u@h/d"):
        assert normalize_url(u) == "postgresql+asyncpg://u@h/d"
    assert str(sqlite_path("/var/lib/chatd.db")) == "/var/lib/chatd.db"
    assert str(sqlite_path("sqlite:///rel/x.db")) == "rel/x.db"
    assert sqlite_path("postgres://u@h/d") is None
    with pytest.raises(ValueError):
        normalize_url("mysql://u@h/d")
    with pytest.raises(ValueError):
        normalize_url("sqlite://")


async def test_last_curs_of_many_users_in_one_query(store: Store) -> None:
    await send(store, "alice", "bob", "m1")
    await send(store, "alice", "carol", "m2")
    assert await store.last_curs(["alice", "bob", "carol", "nobody"]) == {
        "alice": 2,
        "bob": 1,
        "carol": 1,
    }
    assert await store.last_curs([]) == {}


async def test_a_duplicate_creates_no_row_whatever_its_recipient(store: Store) -> None:
    """A resent stored (sender, cmid) with a new `to` each time is answered as the dup it
    is, and no users row is made for those recipients (they were a free way to fill
    the users table)."""
    first = await send(store, "alice", "bob", "c1")
    outs = await asyncio.gather(
        *(store.send("alice", f"stranger{i}", "c1", "x", "text", TS) for i in range(20))
    )
    assert all(o.dup and o.message.mid == first.message.mid for o in outs)
    assert await store.last_curs([f"stranger{i}" for i in range(20)]) == {}
    later = await send(store, "alice", "stranger0", "c2")  # a real message still makes one
    assert not later.dup and await store.last_curs(["stranger0"]) == {"stranger0": 1}
