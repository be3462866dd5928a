"""Writes that store nothing cost nothing up to a budget, and one user's reads take at
most their share of the read pool: one token cannot slow the writer or the readers
everyone shares."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from chatd.server import Server

from .conftest import Clients, MakeConfig, Servers
from .helpers import http_get


async def test_a_loop_of_duplicates_is_throttled_like_sends_past_its_budget(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    """Within the budget a duplicate is free (honest retries); past it each one costs a
    send token, so a loop of them ends in rate_limited, and stores nothing."""
    cfg = make_config(send_burst=5, send_rate=0.001, waste_burst=3, waste_rate=0.001)
    srv = await servers.start(cfg)
    alice = await clients.raw_hello(srv, "alice")
    first = await alice.request({"t": "send", "id": 0, "to": "bob", "cmid": "c", "body": "x"})
    assert first["t"] == "sent"
    replies = []
    for i in range(1, 12):
        replies.append(
            await alice.request({"t": "send", "id": i, "to": "bob", "cmid": "c", "body": "x"})
        )
    dups = [r for r in replies if r["t"] == "sent"]
    assert all(r["dup"] and r["mid"] == first["mid"] for r in dups)
    # 3 free, then 4 tokens left of the burst of 5: 7 duplicates answered, then the
    # over-rate path still answers a stored cmid as a dup but costs nothing more; a new
    # message is now over the rate
    new = await alice.request({"t": "send", "id": "n", "to": "bob", "cmid": "new", "body": "x"})
    assert new["t"] == "error" and new["code"] == "rate_limited"
    assert await srv.store.last_cur("alice") == 1  # one message stored, nothing else


async def test_a_duplicate_within_the_budget_still_costs_no_rate(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    srv = await servers.start(make_config(send_burst=2, send_rate=0.001))
    alice = await clients.raw_hello(srv, "alice")
    for i in range(5):  # the default budget (100) covers these
        r = await alice.request({"t": "send", "id": i, "to": "bob", "cmid": "c", "body": "x"})
        assert r["t"] == "sent"
    r = await alice.request({"t": "send", "id": "2nd", "to": "bob", "cmid": "d", "body": "x"})
    assert r["t"] == "sent" and not r.get("dup")


async def test_marks_on_a_conversation_not_yours_reach_the_writer_once(
    servers: Servers,
    make_config: MakeConfig,
    clients: Clients,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    srv = await servers.start(make_config(waste_burst=5, waste_rate=0.001))
    mallory = await clients.raw_hello(srv, "mallory")
    calls: list[str] = []
    real = srv.store.mark

    def counting(user: str, c: str, kind: Any, upto: int, ts: int) -> Any:
        calls.append(c)
        return real(user, c, kind, upto, ts)

    monkeypatch.setattr(srv.store, "mark", counting)
    for i in range(50):  # the same unknown conversation: refused at once after the first
        r = await mallory.request({"t": "read", "id": i, "conv": "0" * 32, "upto": 1})
        assert r["t"] == "error" and r["code"] == "bad_request"
    assert calls == ["0" * 32]
    codes = []
    for i in range(20):  # new unknown conversations each time: the budget runs out
        conv = f"{i + 1:032x}"
        r = await mallory.request({"t": "delivered", "id": f"d{i}", "conv": conv, "upto": 1})
        codes.append(r["code"])
    assert codes.count("bad_request") == 4 and codes[4:] == ["rate_limited"] * 16
    assert len(calls) == 5  # 1 + 4: the rest never reached the writer


async def test_one_user_holds_at_most_their_share_of_the_read_pool(
    srv: Server, clients: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten connections of one user looping `convs` have at most 2 reads in flight;
    another user's reads still run beside them."""
    real = srv.store.convs
    in_flight: dict[str, int] = {"mallory": 0, "alice": 0}
    most = {"mallory": 0, "alice": 0}
    gate = asyncio.Event()

    async def convs(user: str, limit: int) -> Any:
        in_flight[user] += 1
        most[user] = max(most[user], in_flight[user])
        try:
            if user == "mallory":
                await gate.wait()  # slow reads: each holds its slot until released
            return await real(user, limit)
        finally:
            in_flight[user] -= 1

    monkeypatch.setattr(srv.store, "convs", convs)
    conns = [await clients.raw_hello(srv, "mallory", device=f"d{i}") for i in range(10)]
    for i, c in enumerate(conns):
        await c.send({"t": "convs", "id": i})
    alice = await clients.raw_hello(srv, "alice")
    r = await alice.request({"t": "convs", "id": "a"})  # not stuck behind mallory's
    assert r["t"] == "convs"
    assert most["mallory"] == 2
    gate.set()
    for i, c in enumerate(conns):
        await c.wait_until(lambda fs, i=i: any(f.get("id") == i for f in fs))
    assert most["mallory"] == 2 and in_flight["mallory"] == 0


async def test_catch_up_is_paced_by_the_users_replay_budget(
    servers: Servers, make_config: MakeConfig, clients: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `since=0` replay writes its pages only as fast as the user's budget allows:
    repeated replays cost their sender time, not the node's."""
    srv = await servers.start(make_config(replay_rate=10_000, send_burst=1000))
    alice = await clients.raw_hello(srv, "alice")
    for i in range(60):
        body = "x" * 1000
        await alice.request({"t": "send", "id": i, "to": "bob", "cmid": f"c{i}", "body": body})
    waits: list[float] = []

    async def sleep(seconds: float) -> None:  # record the pacing; do not wait for real
        waits.append(seconds)

    monkeypatch.setattr("chatd.outbox._sleep", sleep)
    bob = await clients.raw_hello(srv, "bob", since=0)
    assert [f["seq"] for f in bob.of_type("msg")] == list(range(1, 61))
    # about 62 KB written against a burst of 40 KB at 10 KB/s: about 2 s owed
    assert len(waits) == 1 and 1.5 < waits[0] < 3.0
    again = await clients.raw_hello(srv, "bob", since=0)  # the budget is the user's
    assert len(again.of_type("msg")) == 60
    assert len(waits) == 2 and waits[1] > 5.0


async def test_readyz_does_not_wait_behind_users_reads(srv: Server) -> None:
    """Every connection of the read pool busy (users' reads): /readyz still answers at
    once, on a connection of its own."""
    engine = srv.store._reads.engine  # type: ignore[attr-defined]
    held = [await engine.connect() for _ in range(srv.store.pool_size)]  # type: ignore[attr-defined]
    try:
        async with asyncio.timeout(5):
            status, body = await http_get(srv.port, "/readyz")
        assert status == 200 and body.startswith("ready")
    finally:
        for conn in held:
            await conn.close()
