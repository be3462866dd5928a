"""The same (sender, cmid) is stored once, whatever the retries (invariant 4)."""

from __future__ import annotations

import asyncio

from chatd.server import Server
from protocol import Msg, Send, Sent

from .conftest import Clients, MakeConfig, Servers
from .helpers import collect, is_t


async def test_duplicate_cmid_answers_original_and_stores_once(
    srv: Server, clients: Clients
) -> None:
    alice = await clients.connect(srv, "alice")
    bob = await clients.raw_hello(srv, "bob")
    first = await alice.send("bob", "hello", cmid="c-1")
    assert first.dup is False

    again = await alice.request(Send(id=alice.next_id(), to="bob", cmid="c-1", body="hello"))
    other = await alice.request(
        Send(id=alice.next_id(), to="carol", cmid="c-1", body="something else", type="x")
    )
    for dup in (again, other):
        assert isinstance(dup, Sent) and dup.dup is True
        assert (dup.mid, dup.conv, dup.seq, dup.ts, dup.cmid) == (
            first.mid,
            first.conv,
            first.seq,
            first.ts,
            "c-1",
        )
        assert dup.cur == first.cur

    after = await alice.send("bob", "after", cmid="c-2")
    assert after.seq == first.seq + 1
    await bob.next(is_t("msg", cmid="c-2"))
    assert [f["cmid"] for f in bob.of_type("msg")] == ["c-1", "c-2"]
    assert [f["body"] for f in bob.of_type("msg")] == ["hello", "after"]

    page = await alice.history("bob")
    assert [m.cmid for m in page.msgs] == ["c-2", "c-1"]
    assert (await alice.history("carol")).msgs == ()
    assert [c.with_ for c in (await alice.convs()).convs] == ["bob"]
    assert await srv.store.last_cur("alice") == 2


async def test_concurrent_duplicates_store_once(srv: Server, clients: Clients) -> None:
    alice = await clients.connect(srv, "alice")
    alice2 = await clients.connect(srv, "alice", device="two")
    bob = await clients.connect(srv, "bob")
    frames = [Send(id=f"r{i}", to="bob", cmid="same", body=f"v{i}") for i in range(10)]
    replies = await asyncio.gather(
        *(c.request(f) for c, f in zip([alice, alice2] * 5, frames, strict=True))
    )
    assert all(isinstance(r, Sent) for r in replies)
    assert len({(r.mid, r.seq) for r in replies if isinstance(r, Sent)}) == 1
    assert sum(1 for r in replies if isinstance(r, Sent) and not r.dup) == 1
    (m,) = await collect(bob, 1, Msg)
    marker = await alice.send("bob", "marker")
    (m2,) = await collect(bob, 1, Msg)
    assert m2.mid == marker.mid and m2.seq == m.seq + 1
    page = await bob.history("alice")
    assert len(page.msgs) == 2


async def test_a_duplicate_costs_no_rate(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    """Retrying a stored cmid must not use up the sender's rate: with a burst of 2, one
    message and any number of its retries still leave room for a second message."""
    srv = await servers.start(make_config(send_burst=2, send_rate=0.001))
    alice = await clients.connect(srv, "alice")
    first = await alice.send("bob", "one", cmid="r-1", retries=0)
    for _ in range(3):
        again = await alice.request(Send(id=alice.next_id(), to="bob", cmid="r-1", body="one"))
        assert isinstance(again, Sent) and again.dup and again.mid == first.mid
    second = await alice.send("bob", "two", cmid="r-2", retries=0)
    assert second.dup is False and second.seq == first.seq + 1


async def test_a_retry_sent_to_oneself_still_gets_the_original(
    srv: Server, clients: Clients
) -> None:
    """ "whatever its `to` and `body`": a stored cmid resent with `to` = the sender
    itself is answered as the dup it is; a new cmid sent to oneself is bad_request."""
    alice = await clients.raw_hello(srv, "alice")
    first = await alice.request({"t": "send", "id": 1, "to": "bob", "cmid": "c", "body": "x"})
    assert first["t"] == "sent" and not first.get("dup")
    again = await alice.request({"t": "send", "id": 2, "to": "alice", "cmid": "c", "body": "y"})
    assert again["t"] == "sent" and again["dup"] is True
    assert (again["mid"], again["seq"], again["cur"]) == (first["mid"], first["seq"], first["cur"])
    err = await alice.request({"t": "send", "id": 3, "to": "alice", "cmid": "new", "body": "y"})
    assert err["t"] == "error" and err["code"] == "bad_request" and err["id"] == 3
    assert await srv.store.find_sent("alice", "new") is None
    assert await srv.store.last_cur("alice") == 1
