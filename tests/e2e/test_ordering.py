"""Per user `cur` order on every connection, `sent` in place of the own `msg`,
and `seq` per conversation under concurrent sends from both sides."""

from __future__ import annotations

import asyncio
from typing import Any

from chatd.server import Server

from .conftest import Clients, MakeConfig, Servers
from .helpers import RawConn, is_t, send_in_groups

STREAM = ("msg", "receipt", "sent")


def stream_after_synced(raw: RawConn) -> tuple[int, list[dict[str, Any]]]:
    """(synced.cur, the stream frames after synced) of a raw connection."""
    kinds = [f["t"] for f in raw.frames]
    s = kinds.index("synced")
    frames = [f for f in raw.frames[s + 1 :] if f["t"] in STREAM and not f.get("dup")]
    return raw.frames[s]["cur"], frames


async def send_many(raw: RawConn, to: str, prefix: str, n: int) -> list[dict[str, Any]]:
    async def one(i: int) -> dict[str, Any]:
        return await raw.request(
            {
                "t": "send",
                "id": f"{prefix}{i}",
                "to": to,
                "cmid": f"{prefix}-{i}",
                "body": f"{prefix} {i}",
            },
            timeout=20,
        )

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def run_concurrent_sends(srv: Server, clients: Clients, n: int) -> None:
    a1 = await clients.raw_hello(srv, "alice", device="a1")
    a2 = await clients.raw_hello(srv, "alice", device="a2")
    b1 = await clients.raw_hello(srv, "bob", device="b1")
    conns = {"a1": a1, "a2": a2, "b1": b1}

    replies = await asyncio.gather(
        send_many(a1, "bob", "a1", n),
        send_many(a2, "bob", "a2", n),
        send_many(b1, "alice", "b1", n),
    )
    for rs in replies:
        assert all(r["t"] == "sent" and not r.get("dup") for r in rs), rs
    last = {"alice": await srv.store.last_cur("alice"), "bob": await srv.store.last_cur("bob")}
    assert last == {"alice": 3 * n, "bob": 3 * n}
    user = {"a1": "alice", "a2": "alice", "b1": "bob"}

    # every connection gets every event of its user, up to the newest cur
    for name, raw in conns.items():
        top = last[user[name]]

        def reached(fr: list[dict[str, Any]], top: int = top) -> bool:
            return any(f.get("cur") == top and f["t"] in STREAM for f in fr)

        await raw.wait_until(reached, timeout=20)

    # seq in the one conversation: 1..3n, no duplicate, across both senders
    seqs = sorted(r["seq"] for rs in replies for r in rs)
    assert seqs == list(range(1, 3 * n + 1))
    assert len({r["conv"] for rs in replies for r in rs}) == 1
    assert len({r["mid"] for rs in replies for r in rs}) == 3 * n

    own_cmids = {name: {r["cmid"] for r in rs} for name, rs in zip(conns, replies, strict=True)}
    for name, raw in conns.items():
        me = user[name]
        synced_cur, frames = stream_after_synced(raw)
        assert synced_cur == 0
        # cur strictly increasing by 1 from synced.cur, no gap, no repeat
        assert [f["cur"] for f in frames] == list(range(1, last[me] + 1)), name
        for f in frames:
            if f["t"] == "msg" and f["from"] == me:
                # own message from another device of mine: a msg; from this one: never
                assert f["cmid"] not in own_cmids[name], (name, f)
            if f["t"] == "sent":
                assert f["cmid"] in own_cmids[name], (name, f)
        sents = [f for f in frames if f["t"] == "sent"]
        assert len(sents) == n  # each own send once, at its cur place
        # the other device of the sender sees this device's messages as msg
        for other, other_raw in conns.items():
            if other != name and user[other] == me:
                _, other_frames = stream_after_synced(other_raw)
                seen = {f["cmid"] for f in other_frames if f["t"] == "msg"}
                assert own_cmids[name] <= seen
        # seq of the conversation, in cur order, strictly increasing
        conv_seqs = [f["seq"] for f in frames if f["t"] in ("msg", "sent")]
        assert conv_seqs == sorted(conv_seqs) and len(set(conv_seqs)) == len(conv_seqs)
        assert not raw.malformed
    # the sent reply's cur is the cur of that message's event in the other device's stream
    a2_by_cmid = {f["cmid"]: f for f in stream_after_synced(a2)[1] if f["t"] == "msg"}
    for r in replies[0]:
        assert a2_by_cmid[r["cmid"]]["cur"] == r["cur"]
        assert a2_by_cmid[r["cmid"]]["seq"] == r["seq"]


async def test_cur_order_with_concurrent_sends_from_every_device(
    servers: Servers, make_config: MakeConfig, clients: Clients, db_url: str
) -> None:
    srv = await servers.start(make_config(db=db_url, send_burst=200))
    await run_concurrent_sends(srv, clients, 34)


async def test_cur_order_without_group_commit(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    srv = await servers.start(make_config(group_commit=False, send_burst=200))
    await run_concurrent_sends(srv, clients, 20)


async def test_seq_per_conversation_concurrent_both_sides(srv: Server, clients: Clients) -> None:
    alice = await clients.connect(srv, "alice")
    bob = await clients.connect(srv, "bob")
    carol = await clients.connect(srv, "carol")
    sends = [alice.send("bob", f"a{i}") for i in range(25)]
    sends += [bob.send("alice", f"b{i}") for i in range(25)]
    sends += [carol.send("alice", f"c{i}") for i in range(10)]
    out = await asyncio.gather(*sends)
    ab = [s for s in out[:50]]
    ca = out[50:]
    assert len({s.conv for s in ab}) == 1 and len({s.conv for s in ca}) == 1
    assert ab[0].conv != ca[0].conv
    assert sorted(s.seq for s in ab) == list(range(1, 51))
    assert sorted(s.seq for s in ca) == list(range(1, 11))
    # each sender's own sends, in the order their cur says, have increasing seq
    for part in (out[:25], out[25:50], ca):
        by_cur = sorted(part, key=lambda s: s.cur)
        assert [s.seq for s in by_cur] == sorted(s.seq for s in part)
    page = await alice.history("bob", limit=200)
    assert [m.seq for m in page.msgs] == list(range(50, 0, -1))
    assert page.more is False


async def test_cur_order_with_marks_racing_sends(srv: Server, clients: Clients) -> None:
    """bob marks each message as it arrives while alice keeps sending: both streams
    (msgs, sents and receipts mixed) stay contiguous on every connection."""
    a = await clients.raw_hello(srv, "alice")
    a_other = await clients.raw_hello(srv, "alice", device="other")
    b = await clients.raw_hello(srv, "bob")
    n = 40

    async def bob_marks() -> None:
        for seq in range(1, n + 1):
            m = await b.next(is_t("msg", seq=seq), timeout=10)
            kind = "read" if seq % 3 == 0 else "delivered"
            r = await b.request({"t": kind, "id": f"m{seq}", "conv": m["conv"], "upto": seq})
            assert r == {"t": "ok", "id": f"m{seq}"}

    await asyncio.gather(bob_marks(), send_in_groups(a, "bob", n, 4, timeout=10))
    last_a = await srv.store.last_cur("alice")
    last_b = await srv.store.last_cur("bob")
    assert last_a == last_b == 2 * n  # n messages and n receipts in each stream
    for raw, top in ((a, last_a), (a_other, last_a), (b, last_b)):

        def reached(fr: list[dict[str, Any]], top: int = top) -> bool:
            return any(f.get("cur") == top and f["t"] in STREAM for f in fr)

        await raw.wait_until(reached)
        _, frames = stream_after_synced(raw)
        assert [f["cur"] for f in frames] == list(range(1, top + 1))
    # each of bob's receipts comes before the ok of the mark that made it
    for seq in range(1, n + 1):
        ok = next(i for i, f in enumerate(b.frames) if f.get("id") == f"m{seq}")
        rec = next(i for i, f in enumerate(b.frames) if f["t"] == "receipt" and f["upto"] == seq)
        assert rec < ok
    kinds = [(f["kind"], f["upto"]) for f in a.of_type("receipt")]
    assert kinds == [("read" if s % 3 == 0 else "delivered", s) for s in range(1, n + 1)]


async def test_send_pipelined_after_hello_comes_after_synced(srv: Server, clients: Clients) -> None:
    alice = await clients.connect(srv, "alice")
    for i in range(3):
        await alice.send("bob", f"m{i}")
    raw = await clients.raw(srv)
    token = srv.ctx.auth.mint("bob")
    await raw.send({"t": "hello", "id": "h", "token": token, "since": 0})
    await raw.send({"t": "send", "id": "s", "to": "alice", "cmid": "early", "body": "hi"})
    sent = await raw.next(is_t("sent"))
    kinds = [f["t"] for f in raw.frames]
    assert kinds[: kinds.index("sent") + 1] == ["welcome", "msg", "msg", "msg", "synced", "sent"]
    assert sent["cur"] == 4
