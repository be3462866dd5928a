"""Typing: relayed to the recipient's devices, never stored, rate limited silently."""

from __future__ import annotations

from chatd.server import Server

from .conftest import Clients, MakeConfig, Servers
from .helpers import is_t


async def test_typing_relayed_to_every_device_of_recipient_and_not_stored(
    srv: Server, clients: Clients
) -> None:
    a1 = await clients.raw_hello(srv, "alice", device="a1")
    a2 = await clients.raw_hello(srv, "alice", device="a2")
    b1 = await clients.raw_hello(srv, "bob", device="b1")
    b2 = await clients.raw_hello(srv, "bob", device="b2")

    await a1.send({"t": "typing", "to": "bob", "on": True})
    for b in (b1, b2):
        ev = await b.next(is_t("typing"))
        assert ev == {"t": "typing", "from": "alice", "on": True}
    await a1.send({"t": "typing", "to": "bob", "on": False, "id": "t2"})
    assert await a1.next(lambda m: m.get("id") == "t2") == {"t": "ok", "id": "t2"}
    for b in (b1, b2):
        assert await b.next(is_t("typing")) == {"t": "typing", "from": "alice", "on": False}

    # a message after it: alice's other device saw no typing (it is for the recipient)
    await a1.request({"t": "send", "id": "s", "to": "bob", "cmid": "c", "body": "hi"})
    await a2.next(is_t("msg", cmid="c"))
    assert a2.of_type("typing") == []
    assert a1.of_type("typing") == []

    # never stored: not in history, not in bob's stream, not replayed
    h = await b1.request({"t": "history", "id": "h", "with": "alice"})
    assert [m["cmid"] for m in h["msgs"]] == ["c"]
    assert await srv.store.last_cur("bob") == 1
    b3 = await clients.raw_hello(srv, "bob", device="b3", since=0)
    assert [f["t"] for f in b3.frames] == ["welcome", "msg", "synced"]


async def test_typing_to_oneself_is_bad_request(srv: Server, clients: Clients) -> None:
    a = await clients.raw_hello(srv, "alice")
    err = await a.request({"t": "typing", "id": 1, "to": "alice", "on": True})
    assert err["t"] == "error" and err["code"] == "bad_request"
    await a.send({"t": "typing", "to": "alice", "on": True})
    err = await a.next(is_t("error"))
    assert err["code"] == "bad_request" and "id" not in err
    assert (await a.request({"t": "ping", "id": 2}))["t"] == "pong"


async def test_typing_over_rate_dropped_silently_without_id(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    srv = await servers.start(make_config(typing_rate=2.0))
    a = await clients.raw_hello(srv, "alice")
    b = await clients.raw_hello(srv, "bob")
    for _ in range(6):
        await a.send({"t": "typing", "to": "bob", "on": True})
    pong = await a.request({"t": "ping", "id": "p"})
    assert pong["t"] == "pong"
    assert a.of_type("error") == []  # dropped silently
    # bob's ping is answered after every typing frame already relayed to him
    await b.request({"t": "ping", "id": "p"})
    n = len(b.of_type("typing"))
    assert 2 <= n < 6  # the burst (2), maybe one refilled, never all six

    err = await a.request({"t": "typing", "id": "tid", "to": "bob", "on": True})
    assert err["t"] == "error" and err["code"] == "rate_limited"
    assert isinstance(err["retry_ms"], int) and err["retry_ms"] > 0
