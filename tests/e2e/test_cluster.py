"""Many nodes: two or three servers on one PostgreSQL, joined by the Redis broker. Alice
and bob on different nodes chat as if they shared one; faults of Redis lose nothing that
was acknowledged, and every online device gets it once, in order, without reconnecting.

The servers run in this process (each its own RedisBroker connections and store), on the
machine's Redis with a prefix of their own, or on a redis-server the test starts itself
when the test stops or kills it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as redis

from chatd.server import Server
from loadtest.redis_server import RedisServer

from .conftest import Clients, MakeConfig, Servers
from .helpers import RawConn, is_t

SHARED_REDIS = "redis://127.0.0.1:6379/0"


class Cluster:
    def __init__(self, servers: Servers, make_config: MakeConfig, db: str, prefix: str) -> None:
        self._servers = servers
        self._make = make_config
        self.db = db
        self.prefix = prefix
        self.nodes: list[Server] = []

    async def start(self, n: int, redis_url: str, **over: Any) -> list[Server]:
        over.setdefault("send_burst", 10_000)
        for i in range(n):
            cfg = self._make(
                db=self.db,
                broker=redis_url,
                broker_prefix=self.prefix,
                node_id=f"node{len(self.nodes) + 1}",
                **over,
            )
            self.nodes.append(await self._servers.start(cfg))
            del i
        return self.nodes


@pytest_asyncio.fixture
async def cluster(
    servers: Servers, make_config: MakeConfig, pg_url: str, prefix: str
) -> AsyncIterator[Cluster]:
    yield Cluster(servers, make_config, pg_url, prefix)


def _stream(raw: RawConn, t: str = "msg") -> list[int]:
    return [f["cur"] for f in raw.of_type(t)]


async def _send_many(raw: RawConn, to: str, n: int, tag: str) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        frame = {"t": "send", "id": f"{tag}{i}", "to": to, "cmid": f"{tag}{i}", "body": "x"}
        out.append(await raw.request(frame))
    return out


async def test_two_people_on_two_nodes_chat_as_on_one(cluster: Cluster, clients: Clients) -> None:
    n1, n2 = await cluster.start(2, SHARED_REDIS)
    alice = await clients.raw_hello(n1, "alice")
    bob = await clients.raw_hello(n2, "bob")
    sent = await alice.request({"t": "send", "id": 1, "to": "bob", "cmid": "a1", "body": "hi"})
    assert sent["t"] == "sent"
    msg = await bob.next(is_t("msg"))
    assert (msg["from"], msg["body"], msg["seq"]) == ("alice", "hi", 1)
    await bob.send({"t": "typing", "to": "alice", "on": True})
    assert (await alice.next(is_t("typing")))["from"] == "bob"
    r = await bob.request({"t": "read", "id": "r", "conv": msg["conv"], "upto": 1})
    assert r == {"t": "ok", "id": "r"}
    receipt = await alice.next(is_t("receipt"))
    assert (receipt["kind"], receipt["upto"], receipt["by"]) == ("read", 1, "bob")


async def test_one_persons_two_devices_on_two_nodes(cluster: Cluster, clients: Clients) -> None:
    n1, n2, n3 = await cluster.start(3, SHARED_REDIS)
    phone = await clients.raw_hello(n1, "alice", device="phone")
    laptop = await clients.raw_hello(n2, "alice", device="laptop")
    bob = await clients.raw_hello(n3, "bob")
    await phone.request({"t": "send", "id": 1, "to": "bob", "cmid": "p1", "body": "from phone"})
    mine = await laptop.next(is_t("msg"))  # her own message, on her other device
    assert (mine["from"], mine["cmid"]) == ("alice", "p1")
    got = await bob.next(is_t("msg"))
    await bob.request({"t": "send", "id": 2, "to": "alice", "cmid": "b1", "body": "hey"})
    await phone.next(is_t("msg", cmid="b1"))
    await laptop.next(is_t("msg", cmid="b1"))
    await laptop.request({"t": "read", "id": "r", "conv": got["conv"], "upto": 2})
    sync = await phone.next(is_t("receipt", by="alice"))  # read-sync to her own devices
    assert (sync["kind"], sync["upto"]) == ("read", 2)


async def test_resume_with_since_on_another_node(cluster: Cluster, clients: Clients) -> None:
    n1, n2 = await cluster.start(2, SHARED_REDIS)
    alice = await clients.raw_hello(n1, "alice")
    bob = await clients.raw_hello(n1, "bob")
    await _send_many(alice, "bob", 3, "a")
    await bob.wait_until(lambda fs: len([f for f in fs if f.get("t") == "msg"]) == 3)
    await bob.close()
    await _send_many(alice, "bob", 4, "b")
    again = await clients.raw_hello(n2, "bob", since=3)
    assert _stream(again) == [4, 5, 6, 7]


async def _flow_through_a_fault(
    cluster: Cluster, clients: Clients, redis_url: str, fault: Any, n: int = 40
) -> None:
    """alice (node 1) sends n messages to bob (node 2, and node 1 as a second device);
    `fault` runs half way. Every device gets every message once, in order."""
    n1, n2 = await cluster.start(2, redis_url, position_interval=0.5)
    alice = await clients.raw_hello(n1, "alice")
    bob2 = await clients.raw_hello(n2, "bob", device="far")
    bob1 = await clients.raw_hello(n1, "bob", device="near")
    sents = await _send_many(alice, "bob", n // 2, "x")
    await fault()
    sents += await _send_many(alice, "bob", n - n // 2, "y")
    assert all(s["t"] == "sent" for s in sents)
    for bob in (bob1, bob2):
        await bob.wait_until(lambda fs: len([f for f in fs if f.get("t") == "msg"]) >= n, 30)
        assert _stream(bob) == list(range(1, n + 1))


async def test_a_redis_connection_kill_loses_nothing(
    cluster: Cluster, clients: Clients, own_redis: RedisServer
) -> None:
    async def kill() -> None:
        admin = redis.Redis.from_url(own_redis.url)
        try:
            await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        finally:
            await admin.aclose()

    await _flow_through_a_fault(cluster, clients, own_redis.url, kill)


async def test_a_redis_restart_loses_nothing(
    cluster: Cluster, clients: Clients, own_redis: RedisServer
) -> None:
    async def restart() -> None:
        own_redis.restart()

    await _flow_through_a_fault(cluster, clients, own_redis.url, restart)


async def test_a_lost_last_event_is_found_by_the_position_check(
    cluster: Cluster, clients: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pub/sub is at most once: a publish lost with no later event behind it is still
    delivered, by the periodic check of every user's position against storage."""
    n1, n2 = await cluster.start(2, SHARED_REDIS, position_interval=0.3)
    alice = await clients.raw_hello(n1, "alice")
    bob = await clients.raw_hello(n2, "bob")
    real = n1.broker.publish

    def lose_bobs(events: Any) -> None:
        real([(u, e) for u, e in events if u != "bob"])

    monkeypatch.setattr(n1.broker, "publish", lose_bobs)
    await alice.request({"t": "send", "id": 1, "to": "bob", "cmid": "lost", "body": "x"})
    msg = await bob.next(is_t("msg"), timeout=10)
    assert (msg["cmid"], msg["cur"]) == ("lost", 1)
    assert n2.positions.checks >= 1


# ------------------------------------------------------------------ limits across the fleet


async def _spread_seen(node: Server) -> None:
    """Until `node` has heard that its users are on other nodes too (the SPREAD event
    that the second node announced on alice's channel), so that it checks in Redis."""
    for _ in range(200):
        if node.limits.stats().solo == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no SPREAD event reached the first node")


async def test_the_send_rate_holds_across_nodes(cluster: Cluster, clients: Clients) -> None:
    n1, n2 = await cluster.start(2, SHARED_REDIS, send_burst=4, send_rate=0.5)
    phone = await clients.raw_hello(n1, "alice", device="phone")
    laptop = await clients.raw_hello(n2, "alice", device="laptop")
    await clients.raw_hello(n2, "bob")
    await _spread_seen(n1)
    answers = []
    for i in range(3):  # 6 sends in a burst of 4, alternating nodes
        for dev, name in ((phone, "p"), (laptop, "l")):
            frame = {"t": "send", "id": i, "to": "bob", "cmid": f"{name}{i}", "body": "x"}
            answers.append(await dev.request(frame))
    assert [a["t"] for a in answers] == ["sent"] * 4 + ["error"] * 2
    assert {a["code"] for a in answers[4:]} == {"rate_limited"}
    assert all(a["retry_ms"] > 0 for a in answers[4:])
    # A refused message was not stored; a resend of a stored one, refused by the rate
    # too, is still answered with the original.
    again = await laptop.request({"t": "send", "id": 9, "to": "bob", "cmid": "p0", "body": "x"})
    assert again["t"] == "sent" and again["dup"] is True
    assert n1.limits.stats().refused + n2.limits.stats().refused == 3


async def test_typing_rate_holds_across_nodes(cluster: Cluster, clients: Clients) -> None:
    n1, n2 = await cluster.start(2, SHARED_REDIS, typing_rate=2.0)
    phone = await clients.raw_hello(n1, "alice", device="phone")
    laptop = await clients.raw_hello(n2, "alice", device="laptop")
    await _spread_seen(n1)
    answers = [
        await dev.request({"t": "typing", "id": i, "to": "bob", "on": True})
        for i, dev in enumerate((phone, laptop, phone))
    ]
    assert [a["t"] for a in answers] == ["ok", "ok", "error"]
    assert answers[2]["code"] == "rate_limited"


async def test_connections_per_user_hold_across_nodes(cluster: Cluster, clients: Clients) -> None:
    n1, n2 = await cluster.start(2, SHARED_REDIS, max_connections_per_user=2)
    first = await clients.raw_hello(n1, "alice", device="1")
    await clients.raw_hello(n2, "alice", device="2")
    third = await clients.raw(n1)
    err = await third.hello(n1.ctx.auth.mint("alice"))
    assert (err["t"], err["code"]) == ("error", "rate_limited")
    assert await third.wait_closed() == 1013
    await clients.raw_hello(n1, "bob")  # another user is not affected
    await first.close()
    for _ in range(100):  # the disconnect reaches Redis in its next round trip
        again = await clients.raw(n2)
        welcome = await again.hello(n2.ctx.auth.mint("alice"))
        if welcome["t"] == "welcome":
            break
        await again.wait_closed()
    assert welcome["t"] == "welcome"


async def test_without_redis_the_nodes_own_limits_apply(
    cluster: Cluster, clients: Clients, own_redis: RedisServer
) -> None:
    n1, n2 = await cluster.start(2, own_redis.url, send_burst=3, send_rate=0.5)
    alice = await clients.raw_hello(n1, "alice")
    await clients.raw_hello(n2, "alice", device="laptop")  # alice is on two nodes
    await clients.raw_hello(n2, "bob")
    await _spread_seen(n1)
    own_redis.pause()  # a stall: the fleet's checks go unanswered
    try:
        answers = [
            await alice.request(
                {"t": "send", "id": i, "to": "bob", "cmid": f"a{i}", "body": "x"}, timeout=10
            )
            for i in range(4)
        ]
    finally:
        own_redis.resume()
    # Served on node 1's own bucket (3), not refused for want of Redis.
    assert [a["t"] for a in answers] == ["sent"] * 3 + ["error"]
    assert answers[3]["code"] == "rate_limited"
    assert n1.limits.stats().unanswered >= 1
