"""The fleet limits (`chatd.limits`): two RedisLimits on one Redis are two nodes of a
fleet; what one counts, the other sees. When Redis goes away they stop answering (the
node's own limits decide) and, back, they count again exactly what each node holds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as redis

from chatd.broker import LiveEvent
from chatd.broker_memory import LocalBroker
from chatd.config import Policy
from chatd.hub import Hub
from chatd.limits import SPREAD, Kind, NodeOnly
from chatd.limits_held import Held
from chatd.limits_redis import RedisLimits
from loadtest.redis_server import RedisServer

SHARED_REDIS = "redis://127.0.0.1:6379/0"
POLICY = Policy(send_rate=0.5, send_burst=3, typing_rate=0.5, max_connections_per_user=2)
"""Slow rates: a token refills in 2 s, far longer than a loaded machine's round trips."""


class Fleet:
    def __init__(self, url: str, prefix: str) -> None:
        self.url, self.prefix = url, prefix
        self.nodes: list[RedisLimits] = []
        self.announced: list[tuple[str, str]] = []

    async def node(self, policy: Policy = POLICY, **kw: Any) -> RedisLimits:
        kw.setdefault("timeout", 3.0)  # a loaded test machine must not look like a fault
        limits = RedisLimits(
            self.url, policy, prefix=self.prefix, node_id=f"n{len(self.nodes) + 1}", **kw
        )
        self.nodes.append(limits)
        name = f"n{len(self.nodes)}"
        await limits.start(lambda user: self.announced.append((name, user)))
        assert limits.stats().up
        return limits

    async def close(self) -> None:
        for node in self.nodes:
            await node.close()


@pytest_asyncio.fixture
async def fleet(prefix: str) -> AsyncIterator[Fleet]:
    f = Fleet(SHARED_REDIS, prefix)
    try:
        yield f
    finally:
        await f.close()
        r = redis.Redis.from_url(SHARED_REDIS)
        keys = [k async for k in r.scan_iter(match=f"{prefix}*")]
        if keys:
            await r.delete(*keys)
        await r.aclose()


async def _take(limits: RedisLimits, kind: Kind, user: str) -> float | None:
    fut = limits.take(kind, user)
    assert fut is not None, "a fleet that is up answers"
    return await fut


async def test_a_send_bucket_is_shared_by_the_nodes(fleet: Fleet) -> None:
    a, b = await fleet.node(), await fleet.node()
    assert [await _take(a, Kind.SEND, "alice") for _ in range(2)] == [0.0, 0.0]
    assert await _take(b, Kind.SEND, "alice") == 0.0  # the third of a burst of 3
    wait = await _take(b, Kind.SEND, "alice")
    assert wait is not None and 0.0 < wait <= 2.0  # one token every 2 s
    refused = await _take(a, Kind.SEND, "alice")
    assert refused is not None and refused > 0.0
    assert await _take(a, Kind.SEND, "bob") == 0.0  # another user's bucket
    a.refund(Kind.SEND, "alice")  # a duplicate gives its token back
    assert await _take(b, Kind.SEND, "alice") == 0.0
    s = a.stats()
    assert (s.allowed, s.refused, s.unanswered) == (3, 1, 0)


async def test_the_bucket_refills_at_the_rate(fleet: Fleet) -> None:
    fast = Policy(send_rate=4.0, send_burst=3)
    a, b = await fleet.node(fast), await fleet.node(fast)
    for _ in range(3):
        assert await _take(a, Kind.SEND, "alice") == 0.0
    wait = await _take(b, Kind.SEND, "alice")
    assert wait is not None and wait > 0.0
    await asyncio.sleep(wait + 0.01)  # the time it said
    assert await _take(b, Kind.SEND, "alice") == 0.0
    again = await _take(a, Kind.SEND, "alice")
    assert again is not None and again > 0.0


async def test_typing_has_a_bucket_of_its_own(fleet: Fleet) -> None:
    a, b = await fleet.node(), await fleet.node()
    assert await _take(a, Kind.TYPING, "alice") == 0.0
    wait = await _take(b, Kind.TYPING, "alice")  # a burst of 1 (typing_rate, at least 1)
    assert wait is not None and 0.0 < wait <= 2.0
    assert await _take(a, Kind.SEND, "alice") == 0.0  # sends are counted apart


async def test_connections_per_user_count_across_nodes(fleet: Fleet) -> None:
    a, b = await fleet.node(), await fleet.node()
    assert await a.connect("alice") is True
    assert await b.connect("alice") is True
    assert await a.connect("alice") is False  # 2 across the fleet
    assert await b.connect("alice") is False
    assert await b.connect("bob") is True
    a.disconnect("alice")
    assert await a.connect("carol") is True  # a round trip of a's after its disconnect
    assert await b.connect("alice") is True  # a's is gone: room for one
    assert await a.connect("alice") is False


async def test_a_dead_nodes_connections_stop_counting(fleet: Fleet) -> None:
    a = await fleet.node(node_ttl=0.5, heartbeat=0.1)
    b = await fleet.node(node_ttl=0.5, heartbeat=0.1)
    assert await a.connect("alice") is True
    assert await a.connect("alice") is True
    assert await b.connect("alice") is False
    assert a._task is not None
    a._task.cancel()  # a crash: no disconnect, no goodbye; its heartbeat stops
    counted = False
    for _ in range(40):  # its incarnation expires within node_ttl (0.5 s)
        counted = await b.connect("alice") is True
        if counted:
            break
        await asyncio.sleep(0.05)
    assert counted


async def test_cancelled_connect_is_not_left_counted(fleet: Fleet) -> None:
    a = await fleet.node()
    task = asyncio.create_task(a.connect("alice"))
    await asyncio.sleep(0)  # queued
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The cancelled one was counted when Redis answered, then undone: room for two.
    assert await a.connect("alice") is True
    assert await a.connect("alice") is True
    assert await a.connect("alice") is False


async def test_without_redis_the_node_decides_then_counts_again(
    own_redis: RedisServer, prefix: str
) -> None:
    f = Fleet(own_redis.url, prefix)
    try:
        a = await f.node(timeout=0.3, backoff=(0.02, 0.1))
        b = await f.node(timeout=0.3, backoff=(0.02, 0.1))
        assert await a.connect("alice") is True
        own_redis.stop()
        # The first check after the loss may wait for its round trip to fail; it is
        # unanswered (the node decides), and so is every check until Redis is back.
        fut = a.take(Kind.SEND, "dave")  # (alice is solo on a)
        assert fut is None or await fut is None
        for _ in range(50):
            if not a.stats().up and not b.stats().up:
                break
            await asyncio.sleep(0.02)
        assert a.take(Kind.SEND, "dave") is None
        assert await a.connect("alice") is None  # counted here: held 2
        assert await b.connect("alice") is None  # the fleet's limit cannot be checked
        a.disconnect("alice")  # held 1 on a
        own_redis.start()  # an empty Redis on the same port
        for _ in range(100):
            if a.stats().up and b.stats().up:
                break
            await asyncio.sleep(0.05)
        assert a.stats().up and b.stats().up
        # Each node registered what it holds: a 1, b 1, so alice is at the limit.
        r = redis.Redis.from_url(own_redis.url)
        held = await r.hgetall(f"{prefix}conns:alice")
        await r.aclose()
        assert sorted(int(v) for v in held.values()) == [1, 1]
        assert await a.connect("alice") is False
        b.disconnect("alice")
        assert await b.connect("carol") is True  # b's round trip after the disconnect
        assert await a.connect("alice") is True
        assert a.stats().reconnects >= 1 and a.stats().unanswered >= 3
    finally:
        await f.close()


async def test_a_user_on_one_node_is_checked_there_until_another_node_holds_them(
    fleet: Fleet,
) -> None:
    a, b = await fleet.node(), await fleet.node()
    assert await a.connect("alice") is True
    assert await a.connect("alice") is True  # two devices, one node: still solo
    assert a.stats().solo == 1
    assert a.take(Kind.SEND, "alice") is None  # a's bucket is the fleet's: no round trip
    assert fleet.announced == []
    assert await b.connect("alice") is False  # 2 at most: refused, nothing announced
    a.disconnect("alice")
    assert await a.connect("carol") is True  # (a's disconnect is in Redis)
    assert await b.connect("alice") is True
    assert fleet.announced == [("n2", "alice")]  # b tells the others (the hub: SPREAD)
    assert (a.stats().solo, b.stats().solo) == (2, 0)  # a: alice (until told), carol
    assert await _take(b, Kind.SEND, "alice") == 0.0
    a.spread("alice")  # what a's hub does with the SPREAD event
    assert await _take(a, Kind.SEND, "alice") == 0.0
    b.disconnect("alice")
    a.spread()  # a broker reconnect: nobody is solo until their next connect
    assert a.stats().solo == 0


async def test_a_closed_node_stops_counting_at_once(fleet: Fleet) -> None:
    a, b = await fleet.node(), await fleet.node()
    assert await a.connect("alice") is True
    assert await a.connect("alice") is True
    await a.close()  # a clean stop: its incarnation leaves the fleet
    assert await b.connect("alice") is True


async def test_a_lapsed_node_registers_again(fleet: Fleet) -> None:
    a = await fleet.node(heartbeat=0.05)
    assert await a.connect("alice") is True
    r = redis.Redis.from_url(SHARED_REDIS)
    try:
        # What other nodes do to a node that stalled past node_ttl: its incarnation
        # is gone and its counts are deleted.
        await r.delete(f"{fleet.prefix}nodes", f"{fleet.prefix}conns:alice")
        held: dict[bytes, bytes] = {}
        for _ in range(100):  # its next heartbeat finds it lapsed: it registers anew
            held = await r.hgetall(f"{fleet.prefix}conns:alice")
            if held:
                break
            await asyncio.sleep(0.02)
        assert list(held.values()) == [b"1"]
        assert await r.zscore(f"{fleet.prefix}nodes", next(iter(held))) is not None
    finally:
        await r.aclose()


async def test_a_rotation_moves_the_counts_without_announcing_anyone(fleet: Fleet) -> None:
    a = await fleet.node(rotate=0.2, heartbeat=0.05)
    assert await a.connect("alice") is True
    assert a.stats().solo == 1
    r = redis.Redis.from_url(SHARED_REDIS)
    key = f"{fleet.prefix}conns:alice"
    try:
        first = await r.hgetall(key)
        rotated = first
        for _ in range(100):  # a new incarnation within about 0.2 s
            rotated = await r.hgetall(key)
            if rotated.keys() != first.keys():
                break
            await asyncio.sleep(0.02)
        assert rotated.keys() != first.keys() and list(rotated.values()) == [b"1"]
    finally:
        await r.aclose()
    assert fleet.announced == []  # its old self is not "another node"
    assert a.stats().solo == 1


async def test_a_spread_while_a_connect_is_answered_keeps_the_user_checked(
    fleet: Fleet,
) -> None:
    a = await fleet.node()
    task = asyncio.create_task(a.connect("alice"))
    await asyncio.sleep(0)  # queued (and maybe sent), not answered
    a.spread("alice")  # a SPREAD about another node's connect, read before the answer
    assert await task is True
    assert a.stats().solo == 0
    assert a.take(Kind.SEND, "alice") is not None


class _Session:
    def __init__(self, user: str) -> None:
        self.user = user
        self.got: list[LiveEvent] = []

    def push_live(self, event: LiveEvent) -> None:
        self.got.append(event)

    def check_position(self, stored: int) -> None:
        return None


class _Recorder(NodeOnly):
    def __init__(self) -> None:
        self.spreads: list[str | None] = []

    def spread(self, user: str | None = None) -> None:
        self.spreads.append(user)


async def test_the_hub_takes_spread_events_for_the_fleet_not_the_sessions() -> None:
    broker, fleet = LocalBroker(), _Recorder()
    hub = Hub(broker, Policy(), fleet)
    await broker.start(hub.deliver)
    alice = _Session("alice")
    await hub.attach(alice)
    hub.deliver("alice", SPREAD)
    hub.deliver("alice", LiveEvent(0, b"typing"))
    assert fleet.spreads == ["alice"]
    assert alice.got == [LiveEvent(0, b"typing")]
    await broker.close()


async def test_node_only_never_answers() -> None:
    limits = NodeOnly()
    await limits.start(lambda user: None)
    assert limits.take(Kind.SEND, "alice") is None
    assert await limits.connect("alice") is None
    limits.disconnect("alice")
    limits.refund(Kind.SEND, "alice")
    assert not limits.stats().up
    await limits.close()


def test_held_a_connect_answered_after_a_spread_is_not_solo() -> None:
    held = Held()
    epoch = held.asking("alice")
    held.spread("alice")  # about another node's connect, read before our answer
    held.answered("alice", True, 0, epoch)
    assert held.counts == {"alice": 1} and held.solo == set()
    epoch = held.asking("alice")
    held.answered("alice", True, 0, epoch)  # a later connect with nobody else: solo
    assert held.counts == {"alice": 2} and held.solo == {"alice"}
    held.released("alice")
    held.released("alice")
    assert held.counts == {} and held.solo == set()


def test_held_refusals_unanswered_and_registration() -> None:
    held = Held()
    held.answered("bob", False, 1, held.asking("bob"))  # refused: nothing held
    held.answered("carol", None, 0, held.asking("carol"))  # unanswered: held, not solo
    assert held.counts == {"carol": 1} and held.solo == set()
    counts, epoch = held.registering()
    assert counts == [("carol", 1)]
    held.registered("carol", 0, epoch)
    assert held.solo == {"carol"}
    counts, epoch = held.registering()
    held.spread()  # a broker resync during the registration
    held.registered("carol", 0, epoch)
    assert held.solo == set()
