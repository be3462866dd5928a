"""Connection-level behaviour: size limit, hello timeout, forged identities,
isolation of bad input, health endpoints, graceful shutdown, slow readers."""

from __future__ import annotations

import asyncio
import socket

import pytest

from chatd.server import Server
from chatd.session import Session
from protocol import Msg, encode_map
from storage.base import StorageUnavailable

from .conftest import Clients, MakeConfig, Servers
from .helpers import RawConn, collect, http_get, is_t, wait_close_code


async def test_frame_over_64k_closes_1009(srv: Server, clients: Clients) -> None:
    raw = await clients.raw_hello(srv, "alice")
    bob = await clients.connect(srv, "bob")
    ok = encode_map({"t": "ping", "id": 1, "pad": "x" * (64 * 1024 - 40)})
    assert len(ok) <= 64 * 1024
    assert (await raw.request({"t": "ping", "id": 1, "pad": "x" * (64 * 1024 - 40)}))["t"] == "pong"
    await raw.send(
        {"t": "send", "id": 2, "to": "bob", "cmid": "big", "body": "x", "pad": "y" * (64 * 1024)}
    )
    assert await raw.wait_closed() == 1009
    assert raw.of_type("sent") == []
    # nothing stored, and others are fine
    await bob.ping()
    assert await srv.store.last_cur("bob") == 0


async def test_hello_timeout_closes_1008(srv: Server, clients: Clients) -> None:
    raw = await clients.raw(srv)
    assert await raw.wait_closed(timeout=5) == 1008
    assert raw.frames == []


async def test_hello_timeout_counts_from_connect_despite_other_frames(
    srv: Server, clients: Clients
) -> None:
    raw = await clients.raw(srv)
    err = await raw.request({"t": "ping", "id": 1})
    assert err["code"] == "unauthorized"
    assert await raw.wait_closed(timeout=5) == 1008


async def test_forged_identity_keys_are_ignored(srv: Server, clients: Clients) -> None:
    mallory = await clients.raw(srv)
    w = await mallory.hello(
        srv.ctx.auth.mint("mallory"), user="alice", sub="alice", **{"from": "alice"}
    )
    assert w["user"] == "mallory"
    await mallory.next(is_t("synced"))
    bob = await clients.raw_hello(srv, "bob")
    sent = await mallory.request(
        {
            "t": "send",
            "id": 1,
            "to": "bob",
            "cmid": "c",
            "body": "I am alice",
            "from": "alice",
            "user": "alice",
            "by": "alice",
            "sender": "alice",
        }
    )
    assert sent["t"] == "sent"
    m = await bob.next(is_t("msg"))
    assert m["from"] == "mallory" and m["to"] == "bob"
    ok = await bob.request(
        {
            "t": "read",
            "id": 2,
            "conv": m["conv"],
            "upto": 1,
            "by": "alice",
            "user": "alice",
            "from": "alice",
        }
    )
    assert ok["t"] == "ok"
    r = await mallory.next(is_t("receipt"))
    assert r["by"] == "bob"
    await mallory.send({"t": "typing", "to": "bob", "on": True, "from": "alice"})
    assert (await bob.next(is_t("typing")))["from"] == "mallory"
    # alice's stream and conversations are untouched
    assert await srv.store.last_cur("alice") == 0
    alice = await clients.connect(srv, "alice")
    assert (await alice.convs()).convs == ()
    # mallory cannot mark alice's conversations with bob either
    a = await alice.send("bob", "real alice")
    err = await mallory.request({"t": "read", "id": 3, "conv": a.conv, "upto": 1})
    assert err["code"] == "bad_request"


async def test_bad_input_never_touches_other_connections(srv: Server, clients: Clients) -> None:
    alice = await clients.connect(srv, "alice")
    bob = await clients.connect(srv, "bob")
    for i in range(3):
        await alice.send("bob", f"before {i}")
    before = await bob.history("alice")
    bob_cur = await srv.store.last_cur("bob")

    async def attacker(user: str, payloads: list[bytes | str]) -> int | None:
        raw = await clients.raw_hello(srv, user)
        for p in payloads:
            await raw.send(p)
        return await raw.wait_closed()

    garbage: list[bytes | str] = [encode_map({"t": 1}), encode_map({"t": "send", "id": 1})]
    garbage += [b"\xc1", "text", b"\x92\x01", encode_map({"t": "x"})[:-1], b"\x00"] * 2
    chat = [alice.send("bob", f"during {i}") for i in range(5)]
    results = await asyncio.gather(attacker("alice", garbage), attacker("bob", garbage), *chat)
    assert results[:2] == [1008, 1008]
    got = await collect(bob, 8, Msg)
    assert [m.body for m in got] == [f"before {i}" for i in range(3)] + [
        f"during {i}" for i in range(5)
    ]
    after = await bob.history("alice")
    assert after.msgs[5:] == before.msgs  # the old rows are unchanged
    assert await srv.store.last_cur("bob") == bob_cur + 5
    await alice.ping()
    assert alice.close_code is None and bob.close_code is None


async def test_health_endpoints(srv: Server, clients: Clients) -> None:
    alice = await clients.connect(srv, "alice")
    await alice.send("bob", "counted")
    assert await http_get(srv.port, "/healthz") == (200, "ok\n")
    status, body = await http_get(srv.port, "/readyz")
    assert status == 200
    status, body = await http_get(srv.port, "/metrics")
    assert status == 200
    assert "chatd_connections 1.0" in body
    assert "chatd_sessions" in body
    assert "chatd_messages_stored_total 1.0" in body
    assert "chatd_storage_batches_total 1.0" in body
    assert "chatd_storage_batched_ops_total 1.0" in body
    status, _ = await http_get(srv.port, "/nope")
    assert status == 404
    status, _ = await http_get(srv.port, "/healthz?x=1")
    assert status == 200


async def test_readyz_fails_when_storage_is_down(
    srv: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def down() -> None:
        raise StorageUnavailable("down")

    monkeypatch.setattr(srv.store, "ping", down)
    status, body = await http_get(srv.port, "/readyz")
    assert status == 503 and "down" not in body
    assert (await http_get(srv.port, "/healthz"))[0] == 200


async def test_graceful_shutdown_closes_clients_1001(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    srv = await servers.start(make_config())
    port = srv.port
    alice = await clients.connect(srv, "alice")
    bob = await clients.connect(srv, "bob")
    pending = await clients.raw(srv)  # not yet said hello
    await alice.send("bob", "last words")
    await servers.stop(srv)
    assert await wait_close_code(alice) == 1001
    assert await wait_close_code(bob) == 1001
    assert await pending.wait_closed() == 1001
    # the server no longer listens
    try:
        await RawConn.open(f"ws://127.0.0.1:{port}/ws")
    except OSError:
        pass
    else:  # pragma: no cover
        raise AssertionError("still listening after stop()")


async def _stalled_bob(srv: Server, clients: Clients) -> tuple[RawConn, Session]:
    """bob on a connection that stopped reading, and his session on the server."""
    # a reader that stops reading: small receive buffer, a queue of one frame
    slow = await clients.raw(srv, max_queue=1, rcvbuf=4096)
    await slow.hello(srv.ctx.auth.mint("bob"))
    await slow.next(is_t("synced"))
    await slow.pause_reading()
    # a small send buffer on the server's side of that connection too (no autotuning),
    # so that a few frames fill the path and the session's writer blocks
    (session,) = [s for s in srv.hub.sessions() if s.user == "bob"]
    sock = session.ws.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return slow, session


@pytest.mark.parametrize(
    "limit",
    [{"outbox_limit": 5}, {"outbox_bytes": 100_000}],  # frames, or bytes: whichever first
    ids=["frames", "bytes"],
)
async def test_slow_reader_closed_1013_and_loses_nothing(
    servers: Servers, make_config: MakeConfig, clients: Clients, limit: dict[str, int]
) -> None:
    srv = await servers.start(make_config(send_burst=1000, **limit))
    alice = await clients.connect(srv, "alice")
    slow, _session = await _stalled_bob(srv, clients)

    body = "z" * (16 * 1024)
    n = 40
    # one at a time: alice's own outbox stays small (the limit is for every connection)
    sents = [await alice.send("bob", body, cmid=f"c{i}") for i in range(n)]
    assert [s.seq for s in sents] == list(range(1, n + 1))
    # every event was handed to bob's session before the last `sent` came back
    slow.start_reading()
    assert await slow.wait_closed(timeout=10) == 1013
    seen = [f["cur"] for f in slow.frames if f["t"] == "msg"]
    assert seen == list(range(1, len(seen) + 1))
    assert len(seen) < n
    cursor = seen[-1] if seen else 0

    bob = await clients.raw_hello(srv, "bob", since=cursor)
    rest = [f["cur"] for f in bob.frames if f["t"] == "msg"]
    assert seen + rest == list(range(1, n + 1))
    assert [f["cmid"] for f in bob.frames if f["t"] == "msg"][-1] == f"c{n - 1}"


async def test_frames_written_directly_and_queued_keep_one_order(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    """An idle session writes a frame without its writer task; while its socket is full
    it queues them for the writer task; when the socket drains it writes directly
    again. One order."""
    srv = await servers.start(make_config(send_burst=1000))
    alice = await clients.connect(srv, "alice")
    slow, session = await _stalled_bob(srv, clients)

    body = "z" * (16 * 1024)
    n = 0
    while not session.ws.paused:  # until the socket's buffer is above its high mark
        n += 1
        assert n <= 200, "the socket never filled"
        await alice.send("bob", body, cmid=f"c{n}")
    queued_from = n + 1
    for _ in range(5):
        n += 1
        await alice.send("bob", body, cmid=f"c{n}")
    assert session.out.queued or session.out._waiter is None  # the later ones wait for the writer
    slow.start_reading()
    await slow.wait_until(lambda fs: sum(f["t"] == "msg" for f in fs) >= n)
    assert not session.ws.paused and session.out.idle  # idle again
    for _ in range(3):  # written directly again
        n += 1
        await alice.send("bob", "small", cmid=f"c{n}")
    await slow.wait_until(lambda fs: sum(f["t"] == "msg" for f in fs) >= n)
    msgs = [f for f in slow.frames if f["t"] == "msg"]
    assert [f["cur"] for f in msgs] == list(range(1, n + 1))
    assert [f["cmid"] for f in msgs] == [f"c{i}" for i in range(1, n + 1)]
    assert queued_from > 1


async def test_a_frame_flood_closes_1008_and_spares_the_others(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    """One connection sending messages faster than max_frame_rate per second (here
    50) is closed 1008; up to that many in a burst are fine, and other connections
    are not touched."""
    srv = await servers.start(make_config(max_frame_rate=50))
    calm = await clients.raw_hello(srv, "bob")
    ok = await clients.raw_hello(srv, "carol")  # hello + 47 pings: 48 messages
    for i in range(47):
        await ok.send({"t": "ping", "id": i})
    await ok.next(is_t("pong", id=46))
    flood = await clients.raw_hello(srv, "alice")
    for i in range(200):
        await flood.send({"t": "ping", "id": i})
    assert await flood.wait_closed() == 1008
    assert len(flood.of_type("pong")) < 50
    assert (await calm.request({"t": "ping", "id": "still"}))["t"] == "pong"
