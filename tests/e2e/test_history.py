"""history: paging, `conv` for an empty one, limits, and only your own conversations."""

from __future__ import annotations

from chatd.server import Server
from storage.base import conv_id

from .conftest import Clients


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
