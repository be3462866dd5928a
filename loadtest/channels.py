"""`python -m loadtest.channels`: chatd's Redis channel design against per-node inboxes,
measured on Redis itself (no chatd in the loop).

Each design runs on a fresh redis-server of its own (127.0.0.1, an ephemeral port, no
persistence, ended by its PID). `--nodes` nodes are simulated in this one asyncio process,
each with its own connections, as that many chatd processes would have them:

- `user` (A, chatd's, see chatd/broker_redis.py): a channel per user, `{prefix}u:{user}`.
  A node SUBSCRIBEs the channels of its users on its one pub/sub connection: what changed,
  at most 512 channels per command, in one write per loop iteration. A session is routable
  once Redis has confirmed its SUBSCRIBE. Publish: `PUBLISH {prefix}u:{user}`, whatever is
  queued pipelined in one round trip on a second connection (one round trip in flight per
  node). Envelope msgpack `[node, ts, cur, data]`.
- `inbox` (B): a channel per node, `{prefix}n:{node}`, and a presence registry, a set per
  user `{prefix}p:{user}` of node ids with a key TTL (`--presence-ttl`). On a third
  connection per node: connect = SADD + EXPIRE, disconnect = SREM, heartbeat = every
  tenth of `--heartbeat` a node EXPIREs a tenth of its users (each user every heartbeat,
  users/heartbeat EXPIREs per second in all). Routable once the SADD is answered. Publish:
  the publishing node's cache (user -> nodes, `--cache-ttl`) answers, or an SMEMBERS does
  (all misses of a flush in one round trip, their PUBLISHes in a second), then PUBLISH
  `[user, node, ts, cur, data]` to the inbox of each of the user's nodes; the receiving node
  filters by user.
- `inbox-lua` (B'): B's registry, but the lookup happens inside Redis: one EVALSHA per
  message PUBLISHes to each node of SMEMBERS. One round trip, never stale, no cache.

Phases, each measured by the redis-server's CPU (its threads' time on a CPU from
/proc/PID/task/*/schedstat, in ns; the 10 ms ticks of /proc/PID/stat go to the JSON as a
check) and this process's CPU:

1. storm: every session (each user on its home node, `--two-devices` of them also on a
   second node) connects at an even pace over `--storm` seconds: the time until the last
   one is routable.
2. idle: only the design's upkeep (B's heartbeats) for `--idle` seconds.
3. steady: `--rate` messages/s for `--duration` s, each to a random user, from a random node
   with no session of that user; latency publish -> receive from the ts in the envelope.
4. churn: the same for `--churn-duration` s while `--churn` sessions/s move to another node.

Accounting: a message is owed to every session of its user that was routable when the
message was queued; its arrival at that session's node pays. After each phase, once every
queue is empty, each pub/sub connection is PINGed: the PONG comes behind every message
published before it, so what is still owed then never comes. It is lost, unless its session
ended within 0.5 s of the message (in flight during a move; the client's resync on
reconnect covers it): moot. A message that reaches a node without a session of its user is
stray (dropped there). The client CPU includes the load generator and this accounting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import psutil  # type: ignore[import-untyped,unused-ignore]
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection

from .procstat import MachineBusy
from .redis_server import RedisServer, private_redis
from .runner import new_loop

__all__ = ["DESIGNS", "Config", "main", "own_redis", "run"]

DESIGNS = ("user", "inbox", "inbox-lua")
LABELS = {"user": "A user channels", "inbox": "B inbox+cache", "inbox-lua": "B' inbox+lua"}
SUBSCRIBE_BATCH = 512
"""Channels per SUBSCRIBE/UNSUBSCRIBE command, as chatd.broker_redis."""
MAX_BATCH = 10_000
"""Messages (or registry operations) per round trip, as RedisBroker's max_batch."""
MOOT_S = 0.5
HEARTBEAT_SLICES = 10
_START_DEADLINE_S = 10.0
_DRAIN_S = 15.0
_JOIN, _LEAVE, _BEAT = 0, 1, 2
_LUA = """
local nodes = redis.call('SMEMBERS', KEYS[1])
for _, n in ipairs(nodes) do redis.call('PUBLISH', ARGV[1] .. n, ARGV[2]) end
return #nodes
"""

Cmd = tuple[bytes | int, ...]
Item = tuple[int, int, float]  # (user, message id, time queued)


# ---------------------------------------------------------------------- redis-server


@contextlib.contextmanager
def own_redis() -> Iterator[RedisServer]:
    """A started RedisServer in a temporary directory, stopped on the way out."""
    with (
        tempfile.TemporaryDirectory(prefix="chatd-channels-") as tmp,
        private_redis(Path(tmp)) as server,
    ):
        yield server


# ---------------------------------------------------------------------- simulation


@dataclass(frozen=True)
class Config:
    nodes: int = 4
    users: int = 20_000
    two_devices: float = 0.1
    rate: float = 10_000.0
    duration: float = 10.0
    storm: float = 2.0
    idle: float = 2.0
    churn: float = 100.0
    churn_duration: float = 5.0
    cache_ttl: float = 1.0
    presence_ttl: int = 30
    heartbeat: float = 10.0
    size: int = 100
    tick: float = 0.001
    seed: int = 1
    prefix: str = "chatd-bench:"


@dataclass
class Counters:
    queued: int = 0
    delivered: int = 0
    stray: int = 0
    unowed: int = 0
    moves: int = 0
    round_trips: int = 0
    second_rt: int = 0
    flushes: int = 0
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    beats: int = 0
    lat: list[float] = field(default_factory=list)


def _pct(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    values.sort()
    return values[min(len(values) - 1, int(len(values) * p / 100.0))]


async def _connect(port: int, name: str) -> Connection:
    # protocol 2 and no socket_timeout, as chatd.broker_redis
    conn = Connection(
        host="127.0.0.1", port=port, protocol=2, socket_timeout=None, client_name=name
    )
    await conn.connect()  # type: ignore[no-untyped-call]
    return conn


class Node:
    """One simulated chatd node: its sessions, connections, queues and tasks."""

    def __init__(self, sim: Sim, idx: int) -> None:
        self.sim, self.idx = sim, idx
        self.id = f"n{idx}".encode()
        self.inbox = sim.inbox_prefix + self.id
        self.sessions: dict[int, int] = {}
        """user -> session id (routable or not yet)"""
        self.pending: dict[int, tuple[int, float]] = {}
        """user -> (session id, monotonic time of connect) until routable"""
        self.outq: deque[Item] = deque()
        self.regq: deque[tuple[int, int]] = deque()
        self.subs: list[int] = []
        self.unsubs: list[int] = []
        self.pings = 0
        self.pongs: deque[asyncio.Future[None]] = deque()
        self.cache: dict[int, tuple[list[bytes], float]] = {}
        self.pub_wake, self.sub_wake, self.reg_wake = (asyncio.Event() for _ in range(3))
        self.flushing = False
        self.conns: list[Connection] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        sim, port = self.sim, self.sim.port
        self.psc = await _connect(port, f"bench-sub-{self.idx}")
        self.pubc = await _connect(port, f"bench-pub-{self.idx}")
        self.conns = [self.psc, self.pubc]
        make = asyncio.create_task
        if sim.design != "user":
            await self.psc.send_command(b"SUBSCRIBE", self.inbox, check_health=False)
            got = await self.psc.read_response(timeout=math.inf)
            assert isinstance(got, list) and got[0] == b"subscribe", got
            self.regc = await _connect(port, f"bench-reg-{self.idx}")
            self.conns.append(self.regc)
            self.tasks += [make(self._registry()), make(self._heartbeat())]
        self.tasks += [make(self._read()), make(self._sub_writer()), make(self._flusher())]

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for conn in self.conns:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)

    # ------------------------------------------------------------ sessions

    def want_join(self, u: int) -> None:
        if self.sim.design == "user":
            self.subs.append(u)
            self.sub_wake.set()
        else:
            self._reg(_JOIN, u)

    def want_leave(self, u: int) -> None:
        if self.sim.design == "user":
            self.unsubs.append(u)
            self.sub_wake.set()
        else:
            self._reg(_LEAVE, u)

    def _reg(self, op: int, u: int) -> None:
        self.regq.append((op, u))
        self.reg_wake.set()

    async def drained(self) -> None:
        """Resolved when every message published before it has reached this node."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pongs.append(fut)
        self.pings += 1
        self.sub_wake.set()
        await fut

    # ------------------------------------------------------------ pub/sub connection

    async def _sub_writer(self) -> None:
        """SUBSCRIBE/UNSUBSCRIBE what changed (512 channels per command) and the drain
        PINGs, in one write per wake-up; the answers come to `_read`."""
        conn, chan = self.psc, self.sim.user_chan
        while True:
            await self.sub_wake.wait()
            self.sub_wake.clear()
            cmds: list[Cmd] = []
            subs, unsubs, self.subs, self.unsubs = self.subs, self.unsubs, [], []
            for name, users in ((b"SUBSCRIBE", subs), (b"UNSUBSCRIBE", unsubs)):
                chans = [chan[u] for u in users]
                step = SUBSCRIBE_BATCH
                cmds += [(name, *chans[i : i + step]) for i in range(0, len(chans), step)]
            cmds += [(b"PING", b"drain")] * self.pings
            self.pings = 0
            if cmds:
                await self.psc.send_packed_command(conn.pack_commands(cmds), check_health=False)

    async def _read(self) -> None:
        sim, conn = self.sim, self.psc
        user = sim.design == "user"
        by_chan, by_name, unpack = sim.by_chan, sim.by_name, msgpack.unpackb
        while True:
            msg = await conn.read_response(timeout=math.inf)
            if not isinstance(msg, list):
                if msg == b"PONG":
                    self.pongs.popleft().set_result(None)
                continue
            kind = msg[0]
            if kind == b"message":
                if user:
                    _node, ts, mid, _data = unpack(msg[2])
                    self.receive(by_chan[msg[1]], mid, ts)
                else:
                    name, _node, ts, mid, _data = unpack(msg[2])
                    self.receive(by_name[name], mid, ts)
            elif kind == b"subscribe":
                u = by_chan.get(msg[1])
                if u is not None:
                    sim.routable(self, u)
            elif kind == b"unsubscribe":
                u = by_chan.get(msg[1])
                if u is not None:
                    sim.done(u)
            elif kind == b"pong":
                self.pongs.popleft().set_result(None)

    def receive(self, u: int, mid: int, ts: float) -> None:
        sim = self.sim
        c = sim.c
        sid = self.sessions.get(u)
        if sid is None:
            c.stray += 1
            return
        entry = sim.owed.get(mid)
        if entry is None or sid not in entry[2]:
            c.unowed += 1
            return
        sids = entry[2]
        sids.remove(sid)
        if not sids:
            del sim.owed[mid]
        c.delivered += 1
        c.lat.append(time.time() - ts)

    # ------------------------------------------------------------ publishing

    async def _round_trip(self, conn: Connection, cmds: list[Cmd]) -> list[Any]:
        await conn.send_packed_command(conn.pack_commands(cmds), check_health=False)
        self.sim.c.round_trips += 1
        return [await conn.read_response(timeout=math.inf) for _ in cmds]

    async def _flusher(self) -> None:
        """Send what is queued, one pipelined round trip (two for B's misses) at a time."""
        flush = {"user": self._flush_user, "inbox": self._flush_inbox}.get(
            self.sim.design, self._flush_lua
        )
        q = self.outq
        while True:
            await self.pub_wake.wait()
            self.pub_wake.clear()
            self.flushing = True
            while q:
                await flush([q.popleft() for _ in range(min(len(q), MAX_BATCH))])
                self.sim.c.flushes += 1
            self.flushing = False

    async def _flush_user(self, batch: list[Item]) -> None:
        sim, node, packb = self.sim, self.id, msgpack.packb
        chan, data = sim.user_chan, sim.data
        cmds: list[Cmd] = [
            (b"PUBLISH", chan[u], packb([node, ts, mid, data])) for u, mid, ts in batch
        ]
        await self._round_trip(self.pubc, cmds)

    async def _flush_inbox(self, batch: list[Item]) -> None:
        sim, node, packb, c = self.sim, self.id, msgpack.packb, self.sim.c
        names, data, cache = sim.names, sim.data, self.cache
        loop = asyncio.get_running_loop()
        now = loop.time()
        cmds: list[Cmd] = []
        misses: dict[int, list[Item]] = {}
        for item in batch:
            u, mid, ts = item
            hit = cache.get(u)
            if hit is not None and hit[1] > now:
                env = packb([names[u], node, ts, mid, data])
                cmds += [(b"PUBLISH", inbox, env) for inbox in hit[0]]
                c.hits += 1
            else:
                misses.setdefault(u, []).append(item)
                c.misses += 1
        lookups: list[Cmd] = [(b"SMEMBERS", sim.pkey[u]) for u in misses]
        replies = await self._round_trip(self.pubc, lookups + cmds)
        if not misses:
            return
        c.lookups += len(misses)
        c.second_rt += 1
        until = loop.time() + sim.cfg.cache_ttl
        prefix = sim.inbox_prefix
        cmds = []
        for (u, items), members in zip(misses.items(), replies, strict=False):
            inboxes = [prefix + m for m in members]
            if sim.cfg.cache_ttl > 0:
                cache[u] = (inboxes, until)
            for _u, mid, ts in items:
                env = packb([names[u], node, ts, mid, data])
                cmds += [(b"PUBLISH", inbox, env) for inbox in inboxes]
        if cmds:
            await self._round_trip(self.pubc, cmds)

    async def _flush_lua(self, batch: list[Item]) -> None:
        sim, node, packb = self.sim, self.id, msgpack.packb
        names, pkey, data, sha, prefix = sim.names, sim.pkey, sim.data, sim.sha, sim.inbox_prefix
        cmds: list[Cmd] = [
            (b"EVALSHA", sha, 1, pkey[u], prefix, packb([names[u], node, ts, mid, data]))
            for u, mid, ts in batch
        ]
        await self._round_trip(self.pubc, cmds)

    # ------------------------------------------------------------ presence registry (B)

    async def _registry(self) -> None:
        """SADD+EXPIRE / SREM / EXPIRE of what is queued, one round trip at a time."""
        sim, q, ttl, key = self.sim, self.regq, self.sim.cfg.presence_ttl, self.sim.pkey
        while True:
            await self.reg_wake.wait()
            self.reg_wake.clear()
            while q:
                ops = [q.popleft() for _ in range(min(len(q), MAX_BATCH))]
                cmds: list[Cmd] = []
                for op, u in ops:
                    if op == _JOIN:
                        cmds += [(b"SADD", key[u], self.id), (b"EXPIRE", key[u], ttl)]
                    elif op == _LEAVE:
                        cmds.append((b"SREM", key[u], self.id))
                    else:
                        cmds.append((b"EXPIRE", key[u], ttl))
                await self.regc.send_packed_command(
                    self.regc.pack_commands(cmds), check_health=False
                )
                for _ in cmds:
                    await self.regc.read_response(timeout=math.inf)
                for op, u in ops:
                    if op == _JOIN:
                        sim.routable(self, u)
                    elif op == _LEAVE:
                        sim.done(u)

    async def _heartbeat(self) -> None:
        """Every heartbeat/10 s, refresh the TTL of a tenth of this node's users."""
        nodes, k = self.sim.cfg.nodes, 0
        while True:
            await asyncio.sleep(self.sim.cfg.heartbeat / HEARTBEAT_SLICES)
            beats = [(_BEAT, u) for u in self.sessions if (u // nodes) % HEARTBEAT_SLICES == k]
            self.regq.extend(beats)
            self.sim.c.beats += len(beats)
            k = (k + 1) % HEARTBEAT_SLICES
            if beats:
                self.reg_wake.set()


class Sim:
    """The nodes of one design on one redis-server, and the accounting."""

    def __init__(self, cfg: Config, design: str, port: int) -> None:
        if cfg.nodes < 2:
            raise ValueError("--nodes: at least 2 (a message comes from another node)")
        self.cfg, self.design, self.port = cfg, design, port
        self.rng = random.Random(cfg.seed)
        p = cfg.prefix.encode()
        self.names = [f"u{i}".encode() for i in range(cfg.users)]
        self.user_chan = [p + b"u:" + n for n in self.names]
        self.pkey = [p + b"p:" + n for n in self.names]
        self.by_chan = {ch: i for i, ch in enumerate(self.user_chan)}
        self.by_name = {n: i for i, n in enumerate(self.names)}
        self.inbox_prefix = p + b"n:"
        self.data = self.rng.randbytes(cfg.size)
        self.sha = b""
        self.scripted = ("smembers", "publish") if design == "inbox-lua" else ()
        """commands that only the publish script calls"""
        self.nodes = [Node(self, i) for i in range(cfg.nodes)]
        self.homes: list[list[int]] = [[] for _ in range(cfg.users)]
        self.est: list[list[int]] = [[] for _ in range(cfg.users)]
        """user -> its routable sessions"""
        self.ended: dict[int, float] = {}
        self.busy: dict[int, int] = {}
        """user -> its connects and disconnects not yet done in Redis"""
        self.owed: dict[int, tuple[float, int, list[int]]] = {}
        """message id -> (time queued, user, the sessions it is owed to)"""
        self.unroutable = self.next_sid = self.next_mid = 0
        self.routable_lat: list[float] = []
        self.c = Counters()

    # ------------------------------------------------------------ sessions

    def join(self, node: Node, u: int) -> None:
        sid = self.next_sid
        self.next_sid += 1
        node.sessions[u] = sid
        node.pending[u] = (sid, time.monotonic())
        self.homes[u].append(node.idx)
        self.busy[u] = self.busy.get(u, 0) + 1
        self.unroutable += 1
        node.want_join(u)

    def leave(self, node: Node, u: int) -> None:
        sid = node.sessions.pop(u)
        self.homes[u].remove(node.idx)
        if sid in self.est[u]:
            self.est[u].remove(sid)
        self.ended[sid] = time.time()
        self.busy[u] = self.busy.get(u, 0) + 1
        node.want_leave(u)

    def routable(self, node: Node, u: int) -> None:
        got = node.pending.pop(u, None)
        if got is None:
            return
        sid, t0 = got
        if node.sessions.get(u) == sid:
            self.est[u].append(sid)
        self.routable_lat.append(time.monotonic() - t0)
        self.unroutable -= 1
        self.done(u)

    def done(self, u: int) -> None:
        """One connect or disconnect of `u` done in Redis."""
        n = self.busy.get(u, 0) - 1
        if n > 0:
            self.busy[u] = n
        else:
            self.busy.pop(u, None)

    # ------------------------------------------------------------ load

    def send_one(self) -> None:
        rng, n = self.rng, self.cfg.nodes
        u = rng.randrange(self.cfg.users)
        homes = self.homes[u]
        src = rng.randrange(n)
        for _ in range(8):
            if src not in homes:
                break
            src = rng.randrange(n)
        mid = self.next_mid
        self.next_mid += 1
        ts = time.time()
        est = self.est[u]
        if est:
            self.owed[mid] = (ts, u, list(est))
        self.nodes[src].outq.append((u, mid, ts))
        self.c.queued += 1

    def move_one(self) -> None:
        rng, n = self.rng, self.cfg.nodes
        for _ in range(20):
            u = rng.randrange(self.cfg.users)
            if u not in self.busy and self.homes[u]:
                break
        else:
            return
        homes = self.homes[u]
        to = [i for i in range(n) if i not in homes]
        if not to:
            return
        self.leave(self.nodes[rng.choice(homes)], u)
        self.join(self.nodes[rng.choice(to)], u)
        self.c.moves += 1

    async def storm(self) -> None:
        """Connect every session at an even pace over cfg.storm seconds; wait until all
        are routable."""
        cfg, rng, n = self.cfg, self.rng, self.cfg.nodes
        pairs = [(u % n, u) for u in range(cfg.users)]
        pairs += [
            ((u + 1 + rng.randrange(n - 1)) % n, u)
            for u in range(cfg.users)
            if rng.random() < cfg.two_devices
        ]
        rng.shuffle(pairs)
        loop = asyncio.get_running_loop()
        start, done, total = loop.time(), 0, len(pairs)
        while done < total:
            el = loop.time() - start
            due = total if cfg.storm <= 0 else min(total, math.ceil(el / cfg.storm * total))
            for node, u in pairs[done:due]:
                self.join(self.nodes[node], u)
            done = max(done, due)
            if done < total:
                await asyncio.sleep(cfg.tick)
        await self._until(lambda: self.unroutable == 0, "every session routable")

    async def traffic(self, rate: float, duration: float, moves: float) -> float:
        """Queue `rate` messages/s (and `moves` moves/s) for `duration` s; the seconds taken."""
        loop = asyncio.get_running_loop()
        n_msgs, n_moves = round(rate * duration), round(moves * duration)
        start, sent, moved = loop.time(), 0, 0
        while sent < n_msgs or moved < n_moves:
            el = loop.time() - start
            for _ in range(min(n_msgs, int(el * rate)) - sent):
                self.send_one()
                sent += 1
            for _ in range(min(n_moves, int(el * moves)) - moved):
                self.move_one()
                moved += 1
            for node in self.nodes:
                if node.outq:
                    node.pub_wake.set()
            await asyncio.sleep(self.cfg.tick)
        return loop.time() - start

    async def drain(self) -> None:
        """Until every queue is sent, every move done, every message received."""
        await self._until(
            lambda: not self.busy and not any(n.outq or n.flushing or n.regq for n in self.nodes),
            "queues empty",
        )
        async with asyncio.timeout(_DRAIN_S):
            await asyncio.gather(*(n.drained() for n in self.nodes))

    async def _until(self, cond: Callable[[], bool], what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _DRAIN_S
        while not cond():
            if loop.time() > deadline:
                raise TimeoutError(f"{self.design}: not {what} after {_DRAIN_S}s")
            await asyncio.sleep(0.005)

    def settle(self) -> dict[str, int]:
        """What is still owed after a drain: lost or moot (see the module docstring)."""
        lost = moot = 0
        for ts, _u, sids in self.owed.values():
            for sid in sids:
                end = self.ended.get(sid)
                if end is not None and end - ts < MOOT_S:
                    moot += 1
                else:
                    lost += 1
        self.owed.clear()
        return {"lost": lost, "moot": moot}


# ---------------------------------------------------------------------- measuring


class Meter:
    """Redis's CPU (its PID), ours, the machine's, and Redis's command counts over a span."""

    def __init__(self, admin: aioredis.Redis, pid: int) -> None:
        self.admin, self.proc = admin, psutil.Process(pid)

    def _redis_cpu(self) -> float:
        """Seconds on a CPU of every thread of the server: /proc/PID/task/*/schedstat
        (nanoseconds; /proc/PID/stat, which psutil reads, counts 10 ms ticks)."""
        total = 0
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9

    def _redis_ticks(self) -> float:
        t = self.proc.cpu_times()
        return float(t.user + t.system)

    async def span(self, work: Coroutine[Any, Any, Any]) -> dict[str, Any]:
        await self.admin.config_resetstat()
        machine = MachineBusy()
        machine.start()
        k0, r0 = self._redis_ticks(), self._redis_cpu()
        c0, w0 = time.process_time(), time.monotonic()
        result = await work
        wall = time.monotonic() - w0
        k1, r1, c1 = self._redis_ticks(), self._redis_cpu(), time.process_time()
        stats = await self.admin.info("commandstats")
        calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
        usec = {k.removeprefix("cmdstat_"): int(v["usec"]) for k, v in stats.items()}
        return {
            "result": result,
            "wall_s": wall,
            "redis_cpu_s": r1 - r0,
            "redis_cpu_s_stat": k1 - k0,
            "client_cpu_s": c1 - c0,
            "machine_busy": machine.share(),
            "redis_calls": calls,
            "redis_cmd_usec": usec,
        }


def _traffic_report(sim: Sim, span: dict[str, Any]) -> dict[str, Any]:
    c, owed_left = sim.c, sim.settle()
    msgs = max(c.queued, 1)
    calls = span["redis_calls"]
    ours = sum(v for k, v in calls.items() if k not in ("config|resetstat", "info", "ping"))
    lat = [x * 1000.0 for x in c.lat]
    return {
        "messages": c.queued,
        "achieved_rate": c.queued / span["result"],
        "owed": c.delivered + owed_left["lost"] + owed_left["moot"],
        "delivered": c.delivered,
        **owed_left,
        "stray": c.stray,
        "unowed": c.unowed,
        "moves": c.moves,
        "wall_s": span["wall_s"],
        "redis_cpu_s": span["redis_cpu_s"],
        "redis_cpu_s_stat": span["redis_cpu_s_stat"],
        "redis_us_per_msg": span["redis_cpu_s"] / msgs * 1e6,
        "redis_s_per_10k": span["redis_cpu_s"] / msgs * 1e4,
        "redis_cmd_us_per_msg": sum(
            # a script's commands are counted in its own time, too
            v
            for k, v in span["redis_cmd_usec"].items()
            if k not in sim.scripted
        )
        / msgs,
        "redis_cmds_per_msg": ours / msgs,
        "client_us_per_msg": span["client_cpu_s"] / msgs * 1e6,
        "client_core": span["client_cpu_s"] / span["wall_s"],
        "redis_core": span["redis_cpu_s"] / span["wall_s"],
        "machine_busy": span["machine_busy"],
        "others_core": max(
            0.0,
            span["machine_busy"] * (os.cpu_count() or 1)
            - (span["redis_cpu_s"] + span["client_cpu_s"]) / span["wall_s"],
        ),
        "p50_ms": _pct(lat, 50),
        "p99_ms": _pct(lat, 99),
        "max_ms": max(lat, default=math.nan),
        "publish_round_trips_per_msg": c.round_trips / msgs,
        "flushes": c.flushes,
        "msgs_per_flush": c.queued / max(c.flushes, 1),
        "flushes_with_2nd_round_trip": c.second_rt / max(c.flushes, 1),
        "lookups_per_msg": c.lookups / msgs,
        "cache_hit": c.hits / max(c.hits + c.misses, 1),
        "heartbeat_expires": c.beats,
        "redis_calls": calls,
    }


async def _run_design(cfg: Config, design: str, server: RedisServer) -> dict[str, Any]:
    admin = aioredis.Redis(host="127.0.0.1", port=server.port, protocol=2)
    sim = Sim(cfg, design, server.port)
    meter = Meter(admin, server.pid)
    out: dict[str, Any] = {"design": design, "label": LABELS[design]}
    out["server"] = {"port": server.port, "pid": server.pid}
    try:
        if design == "inbox-lua":
            sim.sha = str(await admin.script_load(_LUA)).encode()
        for node in sim.nodes:
            await node.start()
        # 1. storm
        span = await meter.span(sim.storm())
        rl = [x * 1000.0 for x in sim.routable_lat]
        out["storm"] = {
            "sessions": len(rl),
            "seconds": span["wall_s"],
            "routable_p50_ms": _pct(rl, 50),
            "routable_p99_ms": _pct(rl, 99),
            "redis_cpu_s": span["redis_cpu_s"],
            "client_cpu_s": span["client_cpu_s"],
            "redis_calls": span["redis_calls"],
        }
        mem = await admin.info("memory")
        out["used_memory_mb"] = int(mem["used_memory"]) / 2**20
        # 2. idle: the upkeep
        sim.c = Counters()
        span = await meter.span(asyncio.sleep(cfg.idle))
        out["idle"] = {
            "seconds": span["wall_s"],
            "redis_cpu_ms_per_s": span["redis_cpu_s"] * 1000.0 / span["wall_s"],
            "redis_calls_per_s": {k: v / span["wall_s"] for k, v in span["redis_calls"].items()},
        }

        # 3. steady; 4. churn
        async def traffic(moves: float, duration: float) -> float:
            took = await sim.traffic(cfg.rate, duration, moves)
            await sim.drain()
            return took

        for phase, moves, duration in (
            ("steady", 0.0, cfg.duration),
            ("churn", cfg.churn, cfg.churn_duration),
        ):
            if duration <= 0 or (phase == "churn" and moves <= 0):
                continue
            sim.c = Counters()
            span = await meter.span(traffic(moves, duration))
            out[phase] = _traffic_report(sim, span)
    finally:
        for node in sim.nodes:
            await node.close()
        await admin.aclose()
    return out


def run(cfg: Config, designs: Sequence[str] = DESIGNS, rounds: int = 1) -> list[dict[str, Any]]:
    """Each design on a redis-server of its own, one after the other; `rounds` times,
    every other round in reverse order."""
    results = []
    with asyncio.Runner(loop_factory=new_loop) as runner:
        for r in range(rounds):
            for design in designs if r % 2 == 0 else designs[::-1]:
                with own_redis() as server:
                    res = runner.run(_run_design(cfg, design, server))
                res["round"] = r + 1
                if rounds > 1:
                    res["label"] += f" #{r + 1}"
                results.append(res)
    return results


# ---------------------------------------------------------------------- report


def _f(x: float, nd: int = 2) -> str:
    return "-" if math.isnan(x) else f"{x:.{nd}f}"


def table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'design':<17}{'redis µs/msg':>13}{'redis s/10k':>12}{'client µs/msg':>14}"
        f"{'p50 ms':>8}{'p99 ms':>8}{'delivered':>10}{'lost':>6}{'storm s':>9}"
        f"{'storm p99 ms':>13}{'storm redis s':>14}"
    )
    lines = [head]
    for r in results:
        s, st = r.get("steady", {}), r["storm"]
        lines.append(
            f"{r['label']:<17}{_f(s.get('redis_us_per_msg', math.nan)):>13}"
            f"{_f(s.get('redis_s_per_10k', math.nan), 4):>12}"
            f"{_f(s.get('client_us_per_msg', math.nan), 1):>14}"
            f"{_f(s.get('p50_ms', math.nan)):>8}{_f(s.get('p99_ms', math.nan)):>8}"
            f"{s.get('delivered', 0):>10}{s.get('lost', 0):>6}{_f(st['seconds']):>9}"
            f"{_f(st['routable_p99_ms'], 1):>13}{_f(st['redis_cpu_s'], 3):>14}"
        )
    lines += [
        "",
        f"{'design':<17}{'cmds/msg':>9}{'cmd µs/msg':>11}{'msg/flush':>10}{'RT/msg':>8}"
        f"{'2nd RT':>7}{'lookup/msg':>11}"
        f"{'cache hit':>10}{'idle redis ms/s':>16}{'mem MB':>8}{'client core':>12}"
        f"{'redis core':>11}{'others':>7}{'churn moves':>12}{'lost':>6}{'stray':>6}{'moot':>6}",
    ]
    for r in results:
        s, ch = r.get("steady", {}), r.get("churn", {})
        lines.append(
            f"{r['label']:<17}{_f(s.get('redis_cmds_per_msg', math.nan)):>9}"
            f"{_f(s.get('redis_cmd_us_per_msg', math.nan)):>11}"
            f"{_f(s.get('msgs_per_flush', math.nan), 1):>10}"
            f"{_f(s.get('publish_round_trips_per_msg', math.nan), 3):>8}"
            f"{_f(100 * s.get('flushes_with_2nd_round_trip', math.nan), 0) + '%':>7}"
            f"{_f(s.get('lookups_per_msg', math.nan)):>11}"
            f"{_f(100 * s.get('cache_hit', math.nan), 0) + '%':>10}"
            f"{_f(r['idle']['redis_cpu_ms_per_s']):>16}{_f(r['used_memory_mb'], 1):>8}"
            f"{_f(100 * s.get('client_core', math.nan), 0) + '%':>12}"
            f"{_f(100 * s.get('redis_core', math.nan), 0) + '%':>11}"
            f"{_f(100 * s.get('others_core', math.nan), 0) + '%':>7}"
            f"{ch.get('moves', 0):>12}{ch.get('lost', 0):>6}{ch.get('stray', 0):>6}"
            f"{ch.get('moot', 0):>6}"
        )
    lines += [
        "",
        "redis CPU: its threads' time on a CPU (schedstat) over the phase, drain included;",
        "client: this one process (all nodes, the generator, the accounting);",
        "storm s: until the last session is routable (A: SUBSCRIBE confirmed, B: SADD answered);",
        "cmds/msg: Redis commands per message (Lua's inner ones too, B's heartbeats too);",
        "cmd µs/msg: Redis's time inside commands (commandstats) per message, the rest of",
        "its CPU is I/O; msg/flush: messages per publish batch (fewer: more syscalls/msg);",
        "RT/msg: publish round trips per message; 2nd RT: B's flushes that needed a lookup;",
        "core: share of one core during steady; others: every other process on the machine;",
        "churn lost: owed to a routable session, never came; stray: reached a node without",
        "the user; moot: its session ended within 0.5 s (in flight in a move: resync).",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(
        prog="python -m loadtest.channels",
        description="chatd's per-user Redis channels against per-node inboxes with a "
        "presence registry, measured on a redis-server of its own (127.0.0.1).",
    )
    p.add_argument("--designs", default=",".join(DESIGNS), help="of: " + ", ".join(DESIGNS))
    p.add_argument("--nodes", type=int, default=d.nodes)
    p.add_argument("--users", type=int, default=d.users)
    p.add_argument(
        "--two-devices", type=float, default=d.two_devices, help="share of users on 2 nodes"
    )
    p.add_argument("--rate", type=float, default=d.rate, help="messages/s")
    p.add_argument("--duration", type=float, default=d.duration, help="steady seconds")
    p.add_argument("--storm", type=float, default=d.storm, help="connect storm seconds")
    p.add_argument("--idle", type=float, default=d.idle, help="idle (upkeep) seconds")
    p.add_argument("--churn", type=float, default=d.churn, help="moves/s (0: no churn phase)")
    p.add_argument("--churn-duration", type=float, default=d.churn_duration)
    p.add_argument("--cache-ttl", type=float, default=d.cache_ttl, help="B's lookup cache, s")
    p.add_argument("--presence-ttl", type=int, default=d.presence_ttl, help="B's key TTL, s")
    p.add_argument("--heartbeat", type=float, default=d.heartbeat, help="B's refresh period")
    p.add_argument("--size", type=int, default=d.size, help="event bytes per message")
    p.add_argument("--tick-ms", type=float, default=d.tick * 1000, help="generator tick")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--rounds", type=int, default=1, help="every other round reversed")
    p.add_argument("--json", type=Path, help="write every figure here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    designs = [x.strip() for x in args.designs.split(",") if x.strip()]
    if bad := [x for x in designs if x not in DESIGNS]:
        raise SystemExit(f"--designs: unknown {bad}; of {DESIGNS}")
    cfg = Config(
        nodes=args.nodes, users=args.users, two_devices=args.two_devices, rate=args.rate,
        duration=args.duration, storm=args.storm, idle=args.idle, churn=args.churn,
        churn_duration=args.churn_duration, cache_ttl=args.cache_ttl,
        presence_ttl=args.presence_ttl, heartbeat=args.heartbeat, size=args.size,
        tick=args.tick_ms / 1000.0, seed=args.seed,
    )  # fmt: skip

    def _term(_sig: int, _frame: object) -> None:
        raise SystemExit(143)  # so that the redis-server is stopped on the way out

    signal.signal(signal.SIGTERM, _term)
    load0 = os.getloadavg()
    t0 = time.monotonic()
    results = run(cfg, designs, max(1, args.rounds))
    load1 = os.getloadavg()
    print(
        f"channels: {cfg.nodes} nodes in 1 asyncio process, {cfg.users} users "
        f"({cfg.two_devices:.0%} on 2 nodes), {cfg.rate:.0f} msg/s for {cfg.duration:g} s, "
        f"storm {cfg.storm:g} s, churn {cfg.churn:g} moves/s for {cfg.churn_duration:g} s, "
        f"B cache {cfg.cache_ttl:g} s; {os.cpu_count()} cores, load "
        f"{load0[0]:.2f} -> {load1[0]:.2f}, {time.monotonic() - t0:.0f} s"
    )
    print(table(results))
    for r in results:
        s = r.get("steady", {})
        notes = []
        if s.get("client_core", 0.0) > 0.9:
            notes.append(f"client saturated ({s['client_core']:.0%} of a core)")
        if s and s["achieved_rate"] < 0.95 * cfg.rate:
            notes.append(f"achieved only {s['achieved_rate']:.0f} msg/s")
        if s and (s["lost"] or s["moot"] or s["delivered"] != s["owed"]):
            notes.append(f"steady: {s['lost']} lost, {s['moot']} moot of {s['owed']}")
        if notes:
            print(f"NOTE {r['label']}: " + "; ".join(notes))
    if args.json is not None:
        doc = {"config": asdict(cfg), "cores": os.cpu_count(), "loadavg": [load0, load1]}
        args.json.write_text(json.dumps(doc | {"designs": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
