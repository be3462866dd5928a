"""A fleet of real `chatd serve` processes on one PostgreSQL database (fresh per test), joined
by Redis, and faults of the processes themselves: a node SIGKILLed while its clients send, a
stalled Redis (SIGSTOP of the test's own redis-server), PostgreSQL unreachable for one node
(through a proxy the test cuts), and HAProxy in front of the nodes (deploy/haproxy.cfg).

Every test asserts, per recipient device, by `cur`: each acknowledged message arrived once,
in the order it was acknowledged, and nothing arrived twice (tests/fleet.py `check_stream`).
Helpers and processes: tests/fleet.py. compose.yaml is checked for agreement with the
options, the Dockerfile and deploy/haproxy.cfg (Docker itself is not run here)."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from sqlalchemy.engine import make_url

from chatd.config import OPTIONS, add_options, config_from_args
from loadtest.redis_server import RedisServer
from storage.sql import SqlStore
from tests.fleet import REPO, Device, Fleet, Haproxy, check_stream, render_haproxy
from tests.storage.tcp_proxy import CuttableProxy

SHARED_REDIS = "redis://127.0.0.1:6379/0"


@pytest_asyncio.fixture
async def fleet(pg_url: str, tmp_path: Path) -> AsyncIterator[Fleet]:
    f = Fleet(pg_url, SHARED_REDIS, f"chatd-fleet-{secrets.token_hex(6)}:", tmp_path)
    try:
        yield f
    finally:
        await f.close()


def cmids(tag: str, n: int, start: int = 0) -> list[str]:
    return [f"{tag}{i}" for i in range(start, start + n)]


async def send_all(dev: Device, to: str, ids: list[str]) -> None:
    for cmid in ids:
        await dev.send(to, cmid)


async def send_through_a_fault(
    routes: list[tuple[Device, str]], n: int, at: int, fault: Callable[[], Awaitable[None]]
) -> dict[str, list[str]]:
    """Each (device, to) sends n messages, one after the other (cmids: the sender's
    initial and a number); `fault` runs once the first has `at` acknowledged, while all
    keep sending. The acknowledged cmids of each sender, in order."""
    acked: dict[str, list[str]] = {dev.user: [] for dev, _to in routes}
    first = routes[0][0].user
    reached = asyncio.Event()

    async def sender(dev: Device, to: str) -> None:
        for cmid in cmids(dev.user[0], n):
            await dev.send(to, cmid)
            acked[dev.user].append(cmid)
            if len(acked[first]) == at:
                reached.set()

    tasks = [asyncio.create_task(sender(dev, to)) for dev, to in routes]
    try:
        async with asyncio.timeout(30):
            await reached.wait()
            await fault()
            await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return acked


# ---------------------------------------------------------------------- the protocol


async def test_the_protocol_with_each_connection_on_another_node(fleet: Fleet) -> None:
    await fleet.start(3)
    phone = fleet.device("alice", "phone")
    bob = fleet.device("bob")
    await phone.connect()
    await bob.connect()
    await send_all(phone, "bob", cmids("a", 3))
    await bob.wait_msgs({"alice": cmids("a", 3)})
    conv = bob.msgs()[0]["conv"]

    assert (await bob.request({"t": "delivered", "conv": conv, "upto": 3}))["t"] == "ok"
    assert phone.conn is not None and bob.conn is not None
    got = await phone.conn.next(lambda f: f.get("t") == "receipt" and f["by"] == "bob")
    assert (got["kind"], got["upto"]) == ("delivered", 3)
    assert (await bob.request({"t": "typing", "to": "alice", "on": True}))["t"] == "ok"
    typing = await phone.conn.next(lambda f: f.get("t") == "typing")
    assert (typing["from"], typing["on"]) == ("bob", True)

    laptop = fleet.device("alice", "laptop")  # a new device: no catch-up of her own
    await laptop.connect()

    # bob away; alice writes from the laptop; bob comes back on another node with `since`
    await bob.close()
    await send_all(laptop, "bob", cmids("a", 2, start=3))
    await bob.connect()
    assert bob.conn is not None
    frames = bob.conn.frames
    synced = next(i for i, f in enumerate(frames) if f.get("t") == "synced")
    assert [f["cmid"] for f in frames[:synced] if f["t"] == "msg"] == ["a3", "a4"]

    assert (await bob.request({"t": "read", "conv": conv, "upto": 5}))["t"] == "ok"
    for dev in (phone, laptop):
        assert dev.conn is not None
        got = await dev.conn.next(lambda f: f.get("t") == "receipt" and f["kind"] == "read")
        assert (got["upto"], got["by"]) == (5, "bob")
    await bob.send("alice", "b0")
    await phone.wait_msgs({"bob": ["b0"]})
    await laptop.wait_msgs({"bob": ["b0"]})

    reader = fleet.device("alice", "reader")  # a fourth connection: history and convs
    await reader.connect()
    hist = await reader.request({"t": "history", "with": "bob"})
    assert [m["cmid"] for m in hist["msgs"]] == ["b0", "a4", "a3", "a2", "a1", "a0"]
    assert [m["seq"] for m in hist["msgs"]] == [6, 5, 4, 3, 2, 1]
    assert (hist["delivered"], hist["read"], hist["more"]) == (5, 5, False)
    (entry,) = (await reader.request({"t": "convs"}))["convs"]
    assert (entry["with"], entry["seq"], entry["unread"], entry["read"]) == ("bob", 6, 1, 5)
    (entry,) = (await bob.request({"t": "convs"}))["convs"]
    assert (entry["with"], entry["unread"]) == ("alice", 0)

    handed = fleet.handed
    assert len(set(handed)) == 3 and all(a != b for a, b in itertools.pairwise(handed))
    check_stream(bob, {"alice": cmids("a", 5)})
    for dev in (phone, laptop):
        check_stream(dev, {"bob": ["b0"]})


# ---------------------------------------------------------------------- a node dies


async def test_a_node_killed_while_its_clients_send_loses_nothing(fleet: Fleet) -> None:
    """alice and bob:tablet live on node1; node1 is SIGKILLed while alice, carol and erin
    send. alice's unanswered send is resent with the same cmid after she reconnects to
    another node with `since`; bob:tablet reconnects with `since` too."""
    n = 60
    await fleet.start(3)
    alice = fleet.device("alice", url=fleet.next_url)  # node1
    carol = fleet.device("carol")  # node2
    erin = fleet.device("erin")  # node3
    tablet = fleet.device("bob", "tablet")  # node1
    phone = fleet.device("bob", "phone")  # node2
    laptop = fleet.device("bob", "laptop")  # node3
    for dev in (alice, carol, erin, tablet, phone, laptop):
        await dev.connect()
    node1 = fleet.nodes[0]
    assert alice.urls == [node1.url] and tablet.urls == [node1.url]

    async def kill() -> None:
        await node1.kill()
        assert tablet.conn is not None
        await tablet.conn.closed.wait()
        await tablet.connect()  # on node2 or node3: node1 is no longer live

    routes = [(alice, "bob"), (carol, "bob"), (erin, "alice")]
    acked = await send_through_a_fault(routes, n, n // 3, kill)

    assert len(alice.urls) >= 2 and node1.url not in alice.urls[1:] + tablet.urls[1:]
    assert alice.resends >= 1  # the send in flight when node1 died, sent again
    to_bob = {"alice": acked["alice"], "carol": acked["carol"]}
    for dev in (tablet, phone, laptop):
        await dev.wait_msgs(to_bob)
        check_stream(dev, to_bob)
    await alice.wait_msgs({"erin": acked["erin"]})
    check_stream(alice, {"erin": acked["erin"]})


# ---------------------------------------------------------------------- Redis stalls


async def test_a_redis_stall_loses_nothing_and_needs_no_reconnect(
    fleet: Fleet, own_redis: RedisServer
) -> None:
    """SIGSTOP of the test's own redis-server while alice (node1) and carol (node2) write
    to bob (a device on each node): sends keep getting `sent` (storage is the truth); the
    nodes notice the silent link; after SIGCONT every device has everything, once, in
    order, on the connection it had all along."""
    fleet.broker = own_redis.url
    node1, node2 = await fleet.start(2)
    alice = fleet.device("alice", url=lambda: node1.url)
    carol = fleet.device("carol", url=lambda: node2.url)
    near = fleet.device("bob", "near", url=lambda: node1.url)
    far = fleet.device("bob", "far", url=lambda: node2.url)
    for dev in (alice, carol, near, far):
        await dev.connect()
    bobs = (near, far)
    marks = [len(node.lines) for node in (node1, node2)]

    async def both_send(tag: str) -> None:
        await asyncio.gather(
            send_all(alice, "bob", cmids(f"a{tag}", 10)),
            send_all(carol, "bob", cmids(f"c{tag}", 10)),
        )

    await both_send("before")
    for bob in bobs:
        await bob.wait_msgs({"alice": cmids("abefore", 10), "carol": cmids("cbefore", 10)})
    own_redis.pause()
    try:
        await both_send("stalled")  # every one answered `sent` while Redis answers nothing
        for node, mark in zip((node1, node2), marks, strict=True):
            await node.wait_log("redis pubsub connection of", after=mark, timeout=15)
            # still ready: sends are stored and sessions catch up from storage
            assert await node.ready() == 200
        await both_send("noticed")
    finally:
        own_redis.resume()
    for node, mark in zip((node1, node2), marks, strict=True):
        await node.wait_log(f"connection of {node.name} back: resync", after=mark)
    await both_send("after")
    phases = ("before", "stalled", "noticed", "after")
    want = {
        "alice": [c for p in phases for c in cmids(f"a{p}", 10)],
        "carol": [c for p in phases for c in cmids(f"c{p}", 10)],
    }
    for bob in bobs:
        await bob.wait_msgs(want)
        check_stream(bob, want)
        assert len(bob.urls) == 1 and bob.conn is not None and not bob.conn.closed.is_set()


# ---------------------------------------------------------------------- PostgreSQL away


async def test_postgres_unreachable_for_a_node(fleet: Fleet, pg_url: str) -> None:
    """node1 reaches PostgreSQL through a proxy the test cuts: its sends are answered
    `unavailable` and nothing of them is stored; /readyz says 503; once the proxy is back
    the same cmids are stored, once each, and bob (on node2) gets each once, in order."""
    url = make_url(pg_url)
    proxy = CuttableProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    store = SqlStore(pg_url)
    await store.open()
    try:
        via_proxy = url.set(port=proxy.port).render_as_string(hide_password=False)
        (node1,) = await fleet.start(1, db=via_proxy)
        (node2,) = await fleet.start(1)
        alice = fleet.device("alice", url=lambda: node1.url)
        bob = fleet.device("bob", url=lambda: node2.url)
        await alice.connect()
        await bob.connect()
        first = await alice.send("bob", "p0")

        proxy.cut()
        outage = cmids("p", 3, start=1)
        replies = await asyncio.gather(
            *(alice.request({"t": "send", "to": "bob", "cmid": c, "body": "x"}) for c in outage)
        )
        assert [(r["t"], r.get("code")) for r in replies] == [("error", "unavailable")] * 3
        assert await node1.ready() == 503
        for c in outage:
            assert await store.find_sent("alice", c) is None
        assert (await store.last_cur("alice"), await store.last_cur("bob")) == (1, 1)

        proxy.restore()
        stored = [await alice.send("bob", c) for c in outage]
        assert all("dup" not in s for s in stored), stored
        again = await alice.request({"t": "send", "to": "bob", "cmid": "p2", "body": "x"})
        assert (again["t"], again.get("dup"), again["mid"]) == ("sent", True, stored[1]["mid"])
        assert [s["seq"] for s in [first, *stored]] == [1, 2, 3, 4]
        assert await node1.ready() == 200
        await bob.wait_msgs({"alice": cmids("p", 4)})
        check_stream(bob, {"alice": cmids("p", 4)})
        assert await store.last_cur("bob") == 4
    finally:
        await fleet.close()
        await store.close()
        await proxy.close()


# ---------------------------------------------------------------------- HAProxy


@pytest.mark.skipif(
    Haproxy.executable() is None and not os.environ.get("CHATD_TEST_REQUIRE_SERVICES"),
    reason="haproxy is not installed (apt-get install -y haproxy)",
)
async def test_haproxy_in_front_balances_and_survives_a_node_kill(
    fleet: Fleet, tmp_path: Path
) -> None:
    """Two nodes behind HAProxy (deploy/haproxy.cfg: round robin, no stickiness, checks
    on /readyz). alice and bob, both through the balancer, land on different nodes and
    chat; alice's node is SIGKILLed while both send: alice comes back through the
    balancer (on bob's node), resends with the same cmid, and nothing is lost."""
    nodes = await fleet.start(2)
    lb = await Haproxy.start(tmp_path, [n.port for n in nodes])
    try:
        alice = fleet.device("alice", url=lambda: lb.url)
        await alice.connect()
        home = [n for n in nodes if await n.metric("chatd_sessions") == 1]
        assert len(home) == 1
        (other,) = [n for n in nodes if n is not home[0]]
        bob = fleet.device("bob", url=lambda: lb.url)
        await bob.connect()  # round robin: the other node
        assert await other.metric("chatd_sessions") == 1

        acked = await send_through_a_fault([(alice, "bob"), (bob, "alice")], 40, 20, home[0].kill)
        assert len(alice.urls) >= 2 and len(bob.urls) == 1 and alice.resends >= 1
        await bob.wait_msgs({"alice": acked["alice"]})
        await alice.wait_msgs({"bob": acked["bob"]})
        check_stream(bob, {"alice": acked["alice"]})
        check_stream(alice, {"bob": acked["bob"]})
        assert await other.metric("chatd_sessions") == 2
        dead = "chatd1" if home[0] is nodes[0] else "chatd2"
        await lb.wait_servers({dead: "DOWN"})  # marked down by its /readyz checks
    finally:
        await fleet.close()
        await lb.stop()


def test_the_haproxy_template_balances_without_stickiness() -> None:
    text = (REPO / "deploy" / "haproxy.cfg").read_text()
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    assert "balance roundrobin" in lines
    assert "option httpchk GET /readyz HTTP/1.1" in lines
    assert any(ln.startswith("timeout tunnel ") for ln in lines)
    for sticky in ("cookie", "stick", "stick-table", "balance source", "hash-type"):
        assert not any(ln.startswith(sticky) for ln in lines), sticky
    rendered = render_haproxy(text, {"chat": 1, "stats": 2}, [3, 4])
    assert "server chatd1 127.0.0.1:3" in rendered and "server chatd2 127.0.0.1:4" in rendered
    assert "resolvers" not in rendered and "127.0.0.11" not in rendered
    binds = [ln.strip() for ln in rendered.splitlines() if ln.strip().startswith("bind")]
    assert binds == ["bind 127.0.0.1:1", "bind 127.0.0.1:2"]


# ---------------------------------------------------------------------- compose.yaml


def _compose() -> dict[str, Any]:
    text = (REPO / "compose.yaml").read_text()
    # ${VAR:?message} and ${VAR:-default}: what `docker compose` interpolates
    text = re.sub(r"\$\{(\w+):[?-][^}]*\}", lambda m: f"test-value-of-{m.group(1)}", text)
    data: dict[str, Any] = yaml.safe_load(text)
    return data


def test_compose_file_agrees_with_the_options_and_the_balancer() -> None:
    services = _compose()["services"]
    nodes = sorted(name for name in services if name.startswith("chatd"))
    assert nodes == ["chatd1", "chatd2"]
    assert {"redis", "postgres", "haproxy"} <= set(services)
    known = {opt.env for opt in OPTIONS}
    pg_env = services["postgres"]["environment"]
    envs = []
    for name in nodes:
        svc = services[name]
        assert svc["build"] == "." or svc["build"]["context"] == "."
        env = {k: str(v) for k, v in svc["environment"].items()}
        envs.append(env)
        assert set(env) <= known, set(env) - known
        assert env["CHATD_NODE_ID"] == name and env["CHATD_HOST"] == "0.0.0.0"
        assert env["CHATD_BROKER"].startswith("redis://redis:")
        db = make_url(env["CHATD_DB"])
        assert (db.host, db.username, db.password, db.database) == (
            "postgres",
            pg_env["POSTGRES_USER"],
            pg_env["POSTGRES_PASSWORD"],
            pg_env["POSTGRES_DB"],
        )
        parser = argparse.ArgumentParser()
        add_options(parser)
        cfg = config_from_args(parser.parse_args([]), env)  # valid as chatd reads it
        assert cfg.node == name and cfg.port == 8765
        assert "/readyz" in " ".join(svc["healthcheck"]["test"])
        deps = svc["depends_on"]
        assert deps["postgres"]["condition"] == deps["redis"]["condition"] == "service_healthy"
    assert envs[0]["CHATD_JWT_SECRET"] == envs[1]["CHATD_JWT_SECRET"]
    assert envs[0]["CHATD_BROKER_PREFIX"] == envs[1]["CHATD_BROKER_PREFIX"]
    assert (REPO / "Dockerfile").exists()

    lb = services["haproxy"]
    mounts = [str(v).split(":") for v in lb["volumes"]]
    assert ["./deploy/haproxy.cfg", "/usr/local/etc/haproxy/haproxy.cfg", "ro"] in mounts
    assert set(lb["depends_on"]) == set(nodes)
    cfg_text = (REPO / "deploy" / "haproxy.cfg").read_text()
    servers = re.findall(r"^\s*server\s+(\S+)\s+(\S+)", cfg_text, re.MULTILINE)
    assert servers == [(name, f"{name}:8765") for name in nodes]
    binds = re.findall(r"^\s*bind\s+:(\d+)", cfg_text, re.MULTILINE)
    published = {str(p).rsplit(":", 1)[1] for p in lb["ports"]}
    assert published == set(binds)
