"""Handshake details and the stream under live traffic while clients come and go."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from chatd.connection import MAX_FRAGMENTS
from chatd.server import Server
from protocol import encode_map
from storage.base import StorageUnavailable

from .conftest import Clients, MakeConfig, Servers, ws_url
from .helpers import RawConn, is_t, send_in_groups


async def test_handshake_details(srv: Server, clients: Clients) -> None:
    raw = await clients.raw(srv)
    assert raw.ws.subprotocol == "chatd.v1"
    await raw.send({"t": "hello", "token": srv.ctx.auth.mint("alice")})  # no id
    w = await raw.next(is_t("welcome"))
    assert "id" not in w and w["user"] == "alice" and w["device"] == "default"
    assert isinstance(w["ts"], int) and w["cur"] == 0
    await raw.next(is_t("synced"))
    await raw.send({"t": "ping"})  # always answered, without id
    pong = await raw.next(is_t("pong"))
    assert "id" not in pong and isinstance(pong["ts"], int)
    assert (await raw.request({"t": "ping", "id": "x" * 64}))["id"] == "x" * 64
    w2 = await clients.raw(srv)
    welcome = await w2.hello(srv.ctx.auth.mint("alice"), device="phone-1", since=None)
    assert welcome["device"] == "phone-1"


async def test_client_without_subprotocol_is_served(srv: Server) -> None:
    from websockets.asyncio.client import connect

    async with connect(ws_url(srv)) as ws:
        assert ws.subprotocol is None
        raw = RawConn(ws)
        w = await raw.hello(srv.ctx.auth.mint("alice"))
        assert w["t"] == "welcome"


async def test_bad_hello_fields(srv: Server, clients: Clients) -> None:
    raw = await clients.raw(srv)
    for rid, extra in (
        (1, {"since": -1}),
        (2, {"since": "3"}),
        (3, {"device": ""}),
        (4, {"device": "d" * 65}),
    ):
        err = await raw.request({"t": "hello", "id": rid, "token": "x", **extra})
        assert err["code"] == "bad_request", extra
    assert (await raw.hello(srv.ctx.auth.mint("alice")))["t"] == "welcome"


async def test_catch_up_pages_beyond_500_events(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    srv = await servers.start(make_config(send_burst=2000, max_frame_rate=5000))
    alice = await clients.raw_hello(srv, "alice")
    n = 1101
    await asyncio.gather(
        *(
            alice.request(
                {"t": "send", "id": i, "to": "bob", "cmid": f"c{i}", "body": str(i)}, timeout=30
            )
            for i in range(n)
        )
    )
    for since in (None, 0, 99):
        extra: dict[str, Any] = {} if since is None else {"since": since}
        bob = await clients.raw(srv)
        await bob.hello(srv.ctx.auth.mint("bob"), **extra)
        await bob.next(is_t("synced"), timeout=20)
        curs = [f["cur"] for f in bob.frames if f["t"] == "msg"]
        assert curs == list(range((since or 0) + 1, n + 1))
        await bob.close()


async def test_reconnecting_with_since_under_live_traffic_loses_nothing(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    """bob's devices connect, take a few events, drop and resume with since, while
    alice keeps sending: together they see every cur exactly once, in order."""
    srv = await servers.start(make_config(send_burst=1000))
    alice = await clients.raw_hello(srv, "alice")
    n = 150

    async def reader(device: str) -> list[int]:
        processed: list[int] = []
        since: int | None = None
        while not processed or processed[-1] < n:
            raw = await RawConn.open(ws_url(srv))
            try:
                extra = {} if since is None else {"since": since}
                await raw.hello(srv.ctx.auth.mint("bob"), device=device, **extra)

                # take up to 7 stream events on this connection, then drop it
                def msgs(fr: list[dict[str, Any]]) -> list[int]:
                    return [f["cur"] for f in fr if f["t"] == "msg"]

                await raw.wait_until(lambda fr: len(msgs(fr)) >= 7 or n in msgs(fr), timeout=20)
                got = msgs(raw.frames)[:7]
            finally:
                await raw.close()
            processed += got
            if got:
                since = got[-1]
        return processed

    results = await asyncio.gather(
        send_in_groups(alice, "bob", n, 5, timeout=20), reader("d1"), reader("d2")
    )
    for seen in results[1:]:
        assert seen is not None
        # nothing is marked delivered: the first (no since) catch-up starts at 1
        assert seen == list(range(1, n + 1))


async def test_pipelined_frames_are_answered_in_order(srv: Server, clients: Clients) -> None:
    """Frames sent before `welcome` wait for it; a frame after a history request waits
    for its answer; sends keep their order."""
    raw = await clients.raw(srv)
    frames: list[dict[str, Any]] = [{"t": "hello", "id": "h", "token": srv.ctx.auth.mint("alice")}]
    frames += [{"t": "send", "id": i, "to": "bob", "cmid": f"p{i}", "body": "x"} for i in range(5)]
    frames += [{"t": "history", "id": "hist", "with": "bob"}, {"t": "ping", "id": "p"}]
    for f in frames:
        await raw.send(f)
    await raw.next(lambda m: m.get("id") == "p")
    await raw.next(lambda m: m.get("id") == 4)
    order = [f.get("id") for f in raw.frames if "id" in f]
    assert order[0] == "h"
    assert [i for i in order if isinstance(i, int)] == list(range(5))
    assert order.index("hist") < order.index("p")
    assert all(f["t"] == "sent" for f in raw.frames if isinstance(f.get("id"), int))


async def test_fragmented_message_is_one_frame(srv: Server, clients: Clients) -> None:
    raw = await clients.raw_hello(srv, "alice")
    data = encode_map({"t": "send", "id": 7, "to": "bob", "cmid": "frag", "body": "y" * 300})
    await raw.ws.send([data[:5], data[5:100], data[100:]])  # three WebSocket frames
    sent = await raw.next(lambda m: m.get("id") == 7)
    assert sent["t"] == "sent" and sent["seq"] == 1
    await raw.ws.send(["not ", "binary"])  # a fragmented text message: one bad_frame
    err = await raw.next(is_t("error"))
    assert err["code"] == "bad_frame"
    pong = await raw.request({"t": "ping", "id": "after"})
    assert pong["t"] == "pong"


async def test_a_message_of_too_many_fragments_closes_1009(srv: Server, clients: Clients) -> None:
    """Empty fragments add no bytes to the size limit: their number is capped instead."""
    raw = await clients.raw_hello(srv, "alice")
    bob = await clients.connect(srv, "bob")
    ping = encode_map({"t": "ping", "id": "many"})
    # websockets ends a fragmented message with one more, empty, frame: MAX_FRAGMENTS
    await raw.ws.send([ping[:1], *([b""] * (MAX_FRAGMENTS - 3)), ping[1:]])
    assert (await raw.next(is_t("pong", id="many")))["t"] == "pong"
    await raw.ws.send([ping[:1], *([b""] * MAX_FRAGMENTS), ping[1:]])
    assert await raw.wait_closed() == 1009
    assert len(raw.of_type("pong")) == 1
    await bob.ping()  # the others are fine


async def test_held_frames_are_released_when_writes_finish(
    servers: Servers, make_config: MakeConfig, clients: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rate-limited send's lookup holds the frames after it, one lookup at a time;
    when the lookups end, every held frame is answered in order, including more
    writes than the in-flight limit (256) allows at once."""
    srv = await servers.start(make_config(send_burst=1, send_rate=0.01))
    loop = asyncio.get_running_loop()
    lookups_may_end = asyncio.Event()

    async def slow_find_sent(*a: Any, **k: Any) -> None:
        await lookups_may_end.wait()

    def slow_mark(*a: Any, **k: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = loop.create_future()
        loop.call_soon(fut.set_exception, StorageUnavailable("slow"))
        return fut

    monkeypatch.setattr(srv.store, "find_sent", slow_find_sent)
    monkeypatch.setattr(srv.store, "mark", slow_mark)
    raw = await clients.raw_hello(srv, "alice")
    sent = await raw.request({"t": "send", "id": "s0", "to": "bob", "cmid": "c0", "body": "x"})
    assert sent["t"] == "sent"
    for i in range(200):  # over the rate: each waits in a lookup task
        await raw.send({"t": "send", "id": f"l{i}", "to": "bob", "cmid": f"l{i}", "body": "x"})
    for i in range(300):  # writes (answered unavailable), held behind the lookups
        await raw.send({"t": "read", "id": f"m{i}", "conv": "nope", "upto": 1})
    await raw.send({"t": "ping", "id": "p"})
    lookups_may_end.set()
    await raw.next(is_t("pong", id="p"))
    await raw.wait_until(lambda fs: sum(1 for f in fs if str(f.get("id"))[:1] == "m") == 300)
    ids = [f.get("id") for f in raw.frames if f.get("id") not in (None, "h", "s0", "p")]
    assert ids[:200] == [f"l{i}" for i in range(200)]  # the lookups, in order, first
    assert sorted(ids[200:]) == sorted(f"m{i}" for i in range(300))


async def test_nothing_after_the_closing_bad_frame_is_acted_on(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    srv = await servers.start(make_config(max_bad_frames=2))
    raw = await clients.raw_hello(srv, "alice")
    proto = raw.ws.protocol
    late = encode_map({"t": "send", "id": 9, "to": "bob", "cmid": "late", "body": "x"})
    for data in (b"\xc1", b"\xc1", late):
        proto.send_binary(data)
    raw.ws.transport.write(b"".join(proto.data_to_send()))  # one TCP segment: one chunk
    assert await raw.wait_closed() == 1008
    assert len(raw.of_type("error")) == 2
    # a later send through the same store commits after anything queued before it
    other = await clients.raw_hello(srv, "alice")
    r = await other.request({"t": "send", "id": 1, "to": "bob", "cmid": "after", "body": "x"})
    assert r["t"] == "sent"
    assert await srv.store.find_sent("alice", "late") is None
