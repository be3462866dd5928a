"""delivered / read: watermarks only move forward (invariant 5), receipts reach
both people's devices, the marking connection gets its receipt before its ok."""

from __future__ import annotations

from typing import Any

import pytest

from chatd.server import Server
from storage.base import conv_id

from .conftest import Clients
from .helpers import RawConn, is_t


def receipts(raw: RawConn) -> list[tuple[str, str, int]]:
    return [(f["by"], f["kind"], f["upto"]) for f in raw.of_type("receipt")]


async def mark(raw: RawConn, kind: str, conv: Any, upto: Any, rid: str) -> dict[str, Any]:
    return await raw.request({"t": kind, "id": rid, "conv": conv, "upto": upto})


async def test_receipts_flow_to_both_people_and_only_forward(srv: Server, clients: Clients) -> None:
    a1 = await clients.raw_hello(srv, "alice", device="a1")
    a2 = await clients.raw_hello(srv, "alice", device="a2")
    b1 = await clients.raw_hello(srv, "bob", device="b1")
    b2 = await clients.raw_hello(srv, "bob", device="b2")
    for i in range(3):
        r = await a1.request(
            {"t": "send", "id": f"s{i}", "to": "bob", "cmid": f"c{i}", "body": "x"}
        )
        assert r["seq"] == i + 1
    conv = r["conv"]
    await b1.next(is_t("msg", seq=3))

    ok = await mark(b1, "delivered", conv, 2, "d1")
    assert ok == {"t": "ok", "id": "d1"}
    rec = b1.of_type("receipt")[-1]
    assert b1.frames.index(rec) < b1.frames.index(ok)  # the receipt comes before the ok
    assert (rec["by"], rec["kind"], rec["upto"], rec["conv"]) == ("bob", "delivered", 2, conv)
    for raw in (a1, a2, b2):
        r2 = await raw.next(is_t("receipt"))
        assert (r2["by"], r2["kind"], r2["upto"]) == ("bob", "delivered", 2)
        assert isinstance(r2["cur"], int) and isinstance(r2["ts"], int)

    # lower or equal: ok, nothing stored, nothing sent
    cur_before = await srv.store.last_cur("bob")
    for upto, rid in ((2, "d2"), (1, "d3"), (0, "d4")):
        assert await mark(b1, "delivered", conv, upto, rid) == {"t": "ok", "id": rid}
    assert await srv.store.last_cur("bob") == cur_before

    # read 3 also raises delivered from 2 to 3, sends only the read receipt
    await mark(b2, "read", conv, 3, "r1")
    for raw in (a1, a2, b1, b2):
        await raw.next(is_t("receipt", kind="read"))
    for raw in (a1, a2, b1, b2):
        assert receipts(raw) == [("bob", "delivered", 2), ("bob", "read", 3)]
    assert await mark(b1, "delivered", conv, 3, "d5") == {"t": "ok", "id": "d5"}
    assert await mark(b1, "read", conv, 2, "r2") == {"t": "ok", "id": "r2"}
    h = await a1.request({"t": "history", "id": "h", "with": "bob"})
    assert (h["delivered"], h["read"]) == (3, 3)
    assert await srv.store.last_cur("bob") == cur_before + 1

    # a mark without id gets no reply, only the receipt
    await a1.request({"t": "send", "id": "s9", "to": "bob", "cmid": "c9", "body": "x"})
    await b1.send({"t": "delivered", "conv": conv, "upto": 4})
    await b1.next(is_t("receipt", upto=4))
    pong = await b1.request({"t": "ping", "id": "p"})
    assert b1.frames[-1] == pong and b1.of_type("ok")[-1]["id"] == "r2"
    assert not any(f.get("t") == "ok" and "id" not in f for f in b1.frames)


async def test_mark_upto_above_last_seq_and_capping(srv: Server, clients: Clients) -> None:
    a = await clients.raw_hello(srv, "alice")
    b = await clients.raw_hello(srv, "bob")
    for i in range(3):
        await a.request({"t": "send", "id": f"s{i}", "to": "bob", "cmid": f"c{i}", "body": "x"})
    r = await b.request({"t": "send", "id": "sb", "to": "alice", "cmid": "cb", "body": "y"})
    conv = r["conv"]
    assert r["seq"] == 4

    err = await mark(b, "read", conv, 5, "x1")
    assert err["t"] == "error" and err["code"] == "bad_request" and err["id"] == "x1"
    # marking up to the newest message on screen (bob's own, seq 4) is capped at 3
    assert (await mark(b, "read", conv, 4, "r1"))["t"] == "ok"
    assert receipts(b) == [("bob", "read", 3)]
    await a.next(is_t("receipt", by="bob"))
    # alice: the last message to her is 4
    assert (await mark(a, "delivered", conv, 4, "d1"))["t"] == "ok"
    assert receipts(a)[-1] == ("alice", "delivered", 4)
    # alice's mark up to 3 (all of them are hers, except none) is capped at 0: nothing
    a_cur = await srv.store.last_cur("alice")
    c2 = await a.request({"t": "send", "id": "s2c", "to": "carol", "cmid": "cc", "body": "z"})
    assert (await mark(a, "read", c2["conv"], 1, "r3"))["t"] == "ok"
    assert await srv.store.last_cur("alice") == a_cur + 1  # only the send, no receipt


async def test_marking_a_conversation_not_yours_is_bad_request(
    srv: Server, clients: Clients
) -> None:
    a = await clients.raw_hello(srv, "alice")
    c = await clients.raw_hello(srv, "carol")
    r = await a.request({"t": "send", "id": "s", "to": "bob", "cmid": "c", "body": "x"})
    conv = r["conv"]
    for kind in ("delivered", "read"):
        for bad_conv, rid in (
            (conv, "1"),
            (conv_id("carol", "dave"), "2"),
            (12345, "3"),
            ("nope", "4"),
        ):
            err = await mark(c, kind, bad_conv, 1, kind + rid)
            assert err["t"] == "error" and err["code"] == "bad_request", (kind, bad_conv, err)
    assert c.of_type("receipt") == []
    h = await a.request({"t": "history", "id": "h", "with": "bob"})
    assert (h["delivered"], h["read"]) == (0, 0)


async def test_convs_watermarks_unread_and_order(srv: Server, clients: Clients) -> None:
    a = await clients.connect(srv, "alice")
    b = await clients.connect(srv, "bob")
    for i in range(3):
        await a.send("bob", f"to bob {i}")
    await a.send("carol", "to carol")
    await a.send("dave", "to dave")
    r = await b.send("alice", "reply")
    convs = (await a.convs()).convs
    assert [c.with_ for c in convs] == ["bob", "dave", "carol"]
    ab = convs[0]
    assert (ab.conv, ab.seq, ab.unread, ab.delivered, ab.read) == (r.conv, 4, 1, 0, 0)
    assert ab.ts == r.ts
    assert [c.unread for c in convs] == [1, 0, 0]

    bc = (await b.convs()).convs
    assert len(bc) == 1 and bc[0].with_ == "alice" and bc[0].unread == 3
    await b.delivered(r.conv, 2)
    bc = (await b.convs()).convs
    assert bc[0].unread == 3  # delivered does not change unread
    await b.read(r.conv, 2)
    assert (await b.convs()).convs[0].unread == 1
    await b.read(r.conv, 4)  # capped at 3
    assert (await b.convs()).convs[0].unread == 0
    ab = (await a.convs()).convs[0]
    assert (ab.delivered, ab.read, ab.unread) == (3, 3, 1)
    await a.read(r.conv, 4)
    assert (await a.convs()).convs[0].unread == 0
    assert [c.with_ for c in (await a.convs(limit=2)).convs] == ["bob", "dave"]
    # newest first: a message to carol moves her to the top
    await a.send("carol", "again")
    assert [c.with_ for c in (await a.convs()).convs] == ["carol", "bob", "dave"]


async def test_a_mark_at_or_below_a_committed_watermark_costs_no_write(
    srv: Server, clients: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Watermarks only move forward: once a mark of this connection committed a
    watermark, marks at or below it are answered `ok` without a store write (a flood
    of them used to queue a write each on the one writer everyone shares). So are
    marks that were capped to nothing (above the last message to the user), until a
    stream event arrives."""
    alice = await clients.raw_hello(srv, "alice")
    bob = await clients.raw_hello(srv, "bob")
    for i in range(3):
        await alice.request({"t": "send", "id": i, "to": "bob", "cmid": f"c{i}", "body": "x"})
    await bob.request({"t": "send", "id": "own", "to": "alice", "cmid": "b", "body": "x"})
    conv = conv_id("alice", "bob")  # seq 1-3 to bob, 4 his own
    real = srv.store.mark
    calls: list[tuple[str, int]] = []

    def counting(user: str, c: str, kind: Any, upto: int, ts: int) -> Any:
        calls.append((kind, upto))
        return real(user, c, kind, upto, ts)

    monkeypatch.setattr(srv.store, "mark", counting)
    r = await bob.request({"t": "read", "id": "r", "conv": conv, "upto": 4})  # capped at 3
    assert r == {"t": "ok", "id": "r"}
    for i in range(100):
        kind = "read" if i % 2 else "delivered"  # read raised delivered too
        r = await bob.request({"t": kind, "id": i, "conv": conv, "upto": 3 - i % 4})
        assert r == {"t": "ok", "id": i}
    assert calls == [("read", 4)]
    r = await bob.request({"t": "read", "id": "again", "conv": conv, "upto": 4})
    assert r == {"t": "ok", "id": "again"} and calls == [("read", 4)] * 2  # 4 > 3: asked
    for i in range(50):  # capped again (no message to bob above 3): no more writes
        r = await bob.request({"t": "delivered", "id": f"d{i}", "conv": conv, "upto": 4})
        assert r == {"t": "ok", "id": f"d{i}"}
    assert calls == [("read", 4)] * 2
    await alice.request({"t": "send", "id": 9, "to": "bob", "cmid": "c9", "body": "x"})
    await bob.next(is_t("msg", seq=5))  # a message to bob: the same mark may count now
    r = await bob.request({"t": "read", "id": "after", "conv": conv, "upto": 4})
    assert r == {"t": "ok", "id": "after"} and calls[-1] == ("read", 4) and len(calls) == 3
    r = await bob.request({"t": "read", "id": "new", "conv": conv, "upto": 5})
    assert r == {"t": "ok", "id": "new"}
    assert [f["upto"] for f in bob.of_type("receipt")] == [3, 4, 5]
