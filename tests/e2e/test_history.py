"""history: paging, `conv` for an empty one, limits, and only your own conversations."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from chatd import session as session_module
from chatd.server import Server
from storage.base import conv_id

from .conftest import Clients, MakeConfig, Servers


async def test_history_paging(srv: Server, clients: Clients) -> None:
    a = await clients.connect(srv, "alice")
    b = await clients.connect(srv, "bob")
    for i in range(7):
        await (a if i % 3 else b).send("bob" if i % 3 else "alice", f"m{i + 1}")
    p1 = await a.history("bob", limit=3)
    assert [m.seq for m in p1.msgs] == [7, 6, 5] and p1.more is True
    assert p1.conv == conv_id("alice", "bob")
    p2 = await a.history("bob", before=5, limit=3)
    assert [m.seq for m in p2.msgs] == [4, 3, 2] and p2.more is True
    p3 = await a.history("bob", before=2, limit=3)
    assert [m.seq for m in p3.msgs] == [1] and p3.more is False
    p4 = await a.history("bob", before=1)
    assert p4.msgs == () and p4.more is False and p4.conv == p1.conv
    full = await b.history("alice")  # default limit 50
    assert [m.body for m in full.msgs] == [f"m{i}" for i in range(7, 0, -1)]
    assert {m.from_ for m in full.msgs} == {"alice", "bob"}
    assert all(m.cur is None for m in full.msgs)  # history messages carry no cur
    exact = await a.history("bob", limit=7)
    assert len(exact.msgs) == 7 and exact.more is False


async def test_history_wire_shape_and_limits(srv: Server, clients: Clients) -> None:
    a = await clients.raw_hello(srv, "alice")
    await a.request({"t": "send", "id": "s", "to": "bob", "cmid": "c", "body": b"\x00bin"})
    h = await a.request({"t": "history", "id": 1, "with": "bob"})
    assert set(h) == {"t", "id", "conv", "msgs", "more", "delivered", "read"}
    (m,) = h["msgs"]
    assert "cur" not in m and m["body"] == b"\x00bin" and m["from"] == "alice"
    empty = await a.request({"t": "history", "id": 2, "with": "zed"})
    assert empty["conv"] == conv_id("alice", "zed") and empty["msgs"] == []
    assert (empty["more"], empty["delivered"], empty["read"]) == (False, 0, 0)
    for rid, limit in ((3, 0), (4, 201), (5, -1), (6, "10")):
        err = await a.request({"t": "history", "id": rid, "with": "bob", "limit": limit})
        assert err["t"] == "error" and err["code"] == "bad_request", (limit, err)
    for rid, limit in ((7, 1), (8, 200)):
        ok = await a.request({"t": "history", "id": rid, "with": "bob", "limit": limit})
        assert ok["t"] == "history"
    for rid, frame in (
        (9, {"with": "alice"}),
        (10, {}),
        (11, {"with": "bad user!"}),
        (12, {"with": "bob", "before": "x"}),
    ):
        err = await a.request({"t": "history", "id": rid, **frame})
        assert err["code"] == "bad_request", (frame, err)
    for rid, limit in ((13, 0), (14, 501)):
        err = await a.request({"t": "convs", "id": rid, "limit": limit})
        assert err["code"] == "bad_request"
    assert (await a.request({"t": "convs", "id": 15, "limit": 500}))["t"] == "convs"


async def test_history_only_of_your_own_conversation(srv: Server, clients: Clients) -> None:
    a = await clients.connect(srv, "alice")
    carol = await clients.connect(srv, "carol")
    for i in range(3):
        await a.send("bob", f"secret {i}")
    page = await carol.history("alice")
    assert page.msgs == () and page.conv == conv_id("alice", "carol")
    assert page.conv != conv_id("alice", "bob")
    page = await carol.history("bob")
    assert page.msgs == ()
    assert (await carol.convs()).convs == ()
    # the bob-alice conversation id cannot be used by carol for history either
    await a.send("carol", "hi carol")
    page = await carol.history("alice")
    assert [m.body for m in page.msgs] == ["hi carol"]


async def _store_big(srv: Server, n: int, size: int) -> None:
    """`n` messages alice -> bob of `size`-byte bodies, straight into the store."""
    for i in range(n):
        await srv.store.send("alice", "bob", f"big{i}", b"x" * size, "bin", 1)


async def test_a_history_page_ends_early_at_its_byte_budget(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    srv = await servers.start(make_config(history_bytes=40_000))
    await _store_big(srv, 5, 16_000)
    raw = await clients.raw_hello(srv, "bob")
    h = await raw.request({"t": "history", "id": 1, "with": "alice", "limit": 200})
    assert [m["seq"] for m in h["msgs"]] == [5, 4] and h["more"] is True  # 48,000 > 40,000
    h = await raw.request({"t": "history", "id": 2, "with": "alice", "before": 4, "limit": 200})
    assert [m["seq"] for m in h["msgs"]] == [3, 2] and h["more"] is True
    h = await raw.request({"t": "history", "id": 3, "with": "alice", "before": 2, "limit": 200})
    assert [m["seq"] for m in h["msgs"]] == [1] and h["more"] is False


async def test_the_python_client_reads_a_full_page_of_the_largest_messages(
    srv: Server, clients: Clients
) -> None:
    """200 bodies of 16 KiB were one 3.3 MB frame, over the client's own size limit."""
    await _store_big(srv, 200, 16 * 1024)
    bob = await clients.connect(srv, "bob")
    page = await bob.history("alice", limit=200)
    assert len(page.msgs) == 64 and page.more  # 1 MiB of bodies
    assert [m.seq for m in page.msgs] == list(range(200, 136, -1))


async def test_a_history_read_starts_once_the_answers_before_it_are_written(
    servers: Servers, make_config: MakeConfig, clients: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that asks for pages faster than it reads them holds one answer in the
    server, not one per request: each read waits until the connection's queued frames
    have gone to the socket."""
    srv = await servers.start(make_config(history_bytes=4 << 20))
    await _store_big(srv, 200, 16 * 1024)  # 3.3 MB per page
    raw = await clients.raw(srv, max_size=8 << 20, max_queue=1, rcvbuf=4096)
    assert (await raw.hello(srv.ctx.auth.mint("bob")))["t"] == "welcome"
    await raw.next(lambda m: m.get("t") == "synced")
    (session,) = [s for s in srv.hub.sessions() if s.user == "bob"]
    real = srv.store.history
    queued_at_read: list[int] = []
    second = asyncio.Event()

    async def history(*args: Any) -> Any:
        queued_at_read.append(session.out.queued + (session.out._waiter is None))
        if len(queued_at_read) == 2:
            second.set()
        return await real(*args)

    monkeypatch.setattr(srv.store, "history", history)
    await raw.pause_reading()  # asks for 8 pages, reads none for now
    for i in range(8):
        await raw.send({"t": "history", "id": i, "with": "alice", "limit": 200})
    async with asyncio.timeout(10):
        await second.wait()
    other = await clients.raw_hello(srv, "carol")  # a few loop turns for the server
    assert (await other.request({"t": "ping", "id": 1}))["t"] == "pong"
    assert len(queued_at_read) == 2  # the third read waits: page 2 is not written yet
    raw.start_reading()
    await raw.wait_until(lambda fs: any(f.get("id") == 7 for f in fs), timeout=30)
    assert [f["id"] for f in raw.of_type("history")] == list(range(8))
    assert queued_at_read[:2] == [0, 0]


async def test_a_history_read_waits_for_queued_frames_a_bounded_time(
    servers: Servers, make_config: MakeConfig, clients: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader with a standing backlog still gets its answer: the wait for queued
    frames ends after _READ_WAIT (it used to wait for an empty queue, forever)."""
    monkeypatch.setattr(session_module, "_READ_WAIT", 0.2)
    srv = await servers.start(make_config(history_bytes=4 << 20, outbox_bytes=64 << 20))
    await _store_big(srv, 200, 16 * 1024)
    raw = await clients.raw(srv, max_size=8 << 20, max_queue=1, rcvbuf=4096)
    assert (await raw.hello(srv.ctx.auth.mint("bob")))["t"] == "welcome"
    await raw.next(lambda m: m.get("t") == "synced")
    real = srv.store.history
    last = asyncio.Event()
    reads = 0

    async def history(*args: Any) -> Any:
        nonlocal reads
        reads += 1
        if reads == 6:
            last.set()
        return await real(*args)

    monkeypatch.setattr(srv.store, "history", history)
    await raw.pause_reading()  # 6 pages of 3.3 MB: more than the socket buffers hold
    for i in range(6):
        await raw.send({"t": "history", "id": i, "with": "alice", "limit": 200})
    async with asyncio.timeout(10):  # pages are still queued: the reads start anyway
        await last.wait()
    raw.start_reading()
    await raw.wait_until(lambda fs: any(f.get("id") == 5 for f in fs), timeout=30)
    assert [f["id"] for f in raw.of_type("history")] == list(range(6))
