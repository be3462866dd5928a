"""Gaps in the live feed (a publish lost or late) meet the frames a session writes
without waking its writer: the stream still goes out in `cur` order, once, and a
session's frames of one loop iteration leave in one socket write."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from chatd.broker import LiveEvent
from chatd.client import ChatClient
from chatd.server import Server
from chatd.session import Session
from protocol import encode_map

from .conftest import Clients, MakeConfig, Servers
from .helpers import RawConn

Publish = Callable[[list[tuple[str, LiveEvent]]], None]


def _drop_publishes(
    srv: Server, user: str, curs: set[int]
) -> tuple[list[tuple[str, LiveEvent]], Publish]:
    """Make the broker drop `user`'s live events at `curs`: (what it dropped, the real
    publish, to deliver them late)."""
    broker = srv.ctx.broker
    real: Publish = broker.publish
    dropped: list[tuple[str, LiveEvent]] = []

    def publish(events: list[tuple[str, LiveEvent]]) -> None:
        keep = []
        for u, ev in events:
            (dropped if u == user and ev.cur in curs else keep).append((u, ev))
        real(keep)

    broker.publish = publish  # type: ignore[method-assign]
    return dropped, real


def _before_reads(srv: Server, hook: Callable[[], None]) -> None:
    """Run `hook` whenever a session starts reading events from storage (a gap fill)."""
    store = srv.ctx.store
    real: Callable[..., Awaitable[Any]] = store.events

    async def events(*a: Any, **kw: Any) -> Any:
        hook()
        return await real(*a, **kw)

    store.events = events  # type: ignore[method-assign]


def _session(srv: Server, user: str) -> Session:
    return next(s for s in srv.hub.sessions() if s.user == user)


def _stream(raw: RawConn) -> list[tuple[str, int]]:
    return [(f["t"], f["cur"]) for f in raw.frames if f["t"] in ("msg", "sent", "receipt")]


async def _alice_and_bob(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> tuple[Server, ChatClient, RawConn]:
    srv = await servers.start(make_config(send_burst=1000))
    return srv, await clients.connect(srv, "alice"), await clients.raw_hello(srv, "bob")


def _has_cur(cur: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda frames: any(f.get("cur") == cur for f in frames)


async def test_lost_publishes_are_filled_in_order(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    srv, alice, bob = await _alice_and_bob(servers, make_config, clients)
    _drop_publishes(srv, "bob", {2, 5})
    for i in (1, 2, 3):
        await alice.send("bob", f"m{i}", cmid=f"c{i}")
    await bob.wait_until(_has_cur(3))
    # bob's own send (its `sent` is cur 4), then alice's cur 5 is lost and cur 6 is live
    r = await bob.request({"t": "send", "id": "s", "to": "alice", "cmid": "b1", "body": "x"})
    assert r["t"] == "sent" and r["cur"] == 4
    await alice.send("bob", "m5", cmid="c5")
    await alice.send("bob", "m6", cmid="c6")
    await bob.wait_until(_has_cur(6))
    assert _stream(bob) == [("msg", 1), ("msg", 2), ("msg", 3), ("sent", 4), ("msg", 5), ("msg", 6)]
    assert srv.ctx.metrics.gap_fills._value.get() == 2


async def test_late_publish_during_a_fill_is_not_written_twice(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    srv, alice, bob = await _alice_and_bob(servers, make_config, clients)
    dropped, publish = _drop_publishes(srv, "bob", {2})

    def late() -> None:  # cur 2 arrives while the writer reads it from storage
        events, dropped[:] = list(dropped), []
        publish(events)

    _before_reads(srv, late)
    for i in (1, 2, 3):
        await alice.send("bob", f"m{i}", cmid=f"c{i}")
    await bob.wait_until(_has_cur(3))
    await alice.send("bob", "m4", cmid="c4")
    await bob.wait_until(_has_cur(4))
    assert _stream(bob) == [("msg", 1), ("msg", 2), ("msg", 3), ("msg", 4)]


async def test_reply_pushed_during_a_fill_keeps_its_place(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    srv, alice, bob = await _alice_and_bob(servers, make_config, clients)
    _drop_publishes(srv, "bob", {2})
    sess = _session(srv, "bob")
    _before_reads(srv, lambda: sess.out.reply(encode_map({"t": "pong"})))
    for i in (1, 2, 3):
        await alice.send("bob", f"m{i}", cmid=f"c{i}")
    await bob.wait_until(lambda fs: any(f["t"] == "pong" for f in fs) and _has_cur(3)(fs))
    kinds = [(f["t"], f.get("cur")) for f in bob.frames if f["t"] in ("msg", "pong")]
    assert kinds == [("msg", 1), ("msg", 2), ("msg", 3), ("pong", None)]


async def test_idle_session_writes_without_waking_its_writer(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    srv, alice, bob = await _alice_and_bob(servers, make_config, clients)
    sess = _session(srv, "bob")
    waiter = sess.out._waiter
    assert waiter is not None and not waiter.done()
    for i in (1, 2, 3):
        await alice.send("bob", f"m{i}", cmid=f"c{i}")
    await bob.wait_until(_has_cur(3))
    assert sess.out._waiter is waiter and not waiter.done()  # never woken


async def test_frames_of_one_loop_iteration_leave_in_one_write(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    # a long commit window: the sends after the first share one transaction, whose
    # results reach bob's session in one loop iteration
    srv = await servers.start(make_config(send_burst=1000, commit_window_ms=100))
    alice = await clients.raw_hello(srv, "alice")
    bob = await clients.raw_hello(srv, "bob")
    await alice.request({"t": "send", "id": 0, "to": "bob", "cmid": "c0", "body": "x"})
    await bob.wait_until(_has_cur(1))
    transport = _session(srv, "bob").ws.transport
    writes: list[bytes] = []
    real = transport.write

    def write(data: bytes) -> None:
        writes.append(data)
        real(data)

    transport.write = write  # type: ignore[method-assign]
    for i in range(1, 5):
        await alice.send({"t": "send", "id": i, "to": "bob", "cmid": f"c{i}", "body": "x"})
    await bob.wait_until(_has_cur(5))
    assert [f["cur"] for f in bob.frames if f["t"] == "msg"] == [1, 2, 3, 4, 5]
    assert len(writes) == 1
