"""RedisLimits: per-user rates and connection counts shared by every node of a fleet.

Rates are GCRA buckets (one key per user and kind, `{prefix}rl:send:{user}`: the
theoretical arrival time in µs of Redis' own clock, so nodes' clocks do not matter),
checked and updated by one Lua script. Connections: a hash per user,
`{prefix}conns:{user}`, of node incarnation -> connections there, and a sorted set
`{prefix}nodes` of incarnation -> expiry (a heartbeat every `heartbeat` seconds keeps
it `node_ttl` ahead). The connect script counts the fields of live incarnations only
and deletes the others: a node that died stops counting within `node_ttl`.

Every check is queued and sent, with everything else queued in the same loop
iteration, as one pipelined round trip on a connection of this node's own.

What is counted stays right through faults because an incarnation is never reused:
each (re)connection, and every `rotate` seconds, the node takes a new one, removes the
old, and registers what it holds now (`_held`, kept here: connections that were not
refused, counted locally while Redis did not answer). A round trip that fails drops
the connection; its checks, and all queued, answer None (the node's own limits
decide), and until a new connection is up every check answers None at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from redis.asyncio.connection import AbstractConnection

from .config import Policy
from .limits import FleetStats, Kind
from .limits_held import Held
from .redis_link import settings, supervise

__all__ = ["RedisLimits"]

log = logging.getLogger("chatd.limits")

_RATE = b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local v = redis.call('GET', KEYS[1])
local tat = v and tonumber(v) or now
if tat < now then tat = now end
if ARGV[3] == '-1' then
  tat = tat - interval
  if tat <= now then redis.call('DEL', KEYS[1]) return 0 end
else
  local wait = tat + interval - tonumber(ARGV[2]) * interval - now
  if wait > 0 then return math.ceil(wait) end
  tat = tat + interval
end
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
return 0
"""
"""GCRA: KEYS[1] the bucket; ARGV interval (µs), burst, '1' take or '-1' refund.
Returns 0 (taken) or the µs until a take would be allowed (nothing taken)."""

_CONNECT = b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all = redis.call('HGETALL', KEYS[1])
local total, others = 0, 0
for i = 1, #all, 2 do
  local f = all[i]
  if f ~= ARGV[1] and (tonumber(redis.call('ZSCORE', KEYS[2], f)) or 0) < now then
    redis.call('HDEL', KEYS[1], f)
  else
    local n = tonumber(all[i + 1])
    total = total + n
    if f ~= ARGV[1] and n > 0 then others = others + 1 end
  end
end
if total >= tonumber(ARGV[2]) then return {0, others} end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, others}
"""
"""KEYS[1] the user's connections, KEYS[2] the live incarnations; ARGV ours, the most
connections, the key's TTL (ms). Returns {1 (counted) or 0 (refused), other nodes
holding connections of the user}."""

_DISCONNECT = b"""
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"""

_BEAT = b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local was = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], 3 * tonumber(ARGV[2]))
if was and was >= now then return 1 end
return 0
"""
"""KEYS[1] the live incarnations (a key that outlives the last node by 3 TTLs); ARGV
ours, its TTL (ms). Returns 0 if ours had lapsed (or is new): other nodes may have
deleted its counts."""

_REGISTER = b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[4] ~= '' then redis.call('HDEL', KEYS[1], ARGV[4]) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local all = redis.call('HGETALL', KEYS[1])
local others = 0
for i = 1, #all, 2 do
  if all[i] ~= ARGV[1] and tonumber(all[i + 1]) > 0
     and (tonumber(redis.call('ZSCORE', KEYS[2], all[i])) or 0) >= now then
    others = others + 1
  end
end
return others
"""
"""KEYS[1] the user's connections, KEYS[2] the live incarnations; ARGV ours, how many
it holds, the key's TTL (ms), the incarnation it replaces ('' if none: its count moves
to ours in one step). Returns the other live incarnations holding the user."""

_SCRIPTS = (_RATE, _CONNECT, _DISCONNECT, _BEAT, _REGISTER)


class _Op(Enum):
    TAKE = 0
    REFUND = 1
    CONNECT = 2
    DISCONNECT = 3
    LEAVE = 4
    """Closing: this node's counts stop counting at once."""


@dataclass(slots=True)
class _Check:
    op: _Op
    user: str
    kind: Kind = Kind.SEND
    fut: asyncio.Future[float | None] | None = field(default=None)
    epoch: int = 0
    """A CONNECT's `Held.asking` epoch (see `limits_held`)."""


class RedisLimits:
    """`FleetLimits` on one Redis (see the module docstring)."""

    def __init__(
        self,
        url: str,
        policy: Policy,
        *,
        prefix: str = "chatd:",
        node_id: str = "",
        timeout: float = 1.0,
        heartbeat: float = 2.0,
        node_ttl: float = 10.0,
        rotate: float = 6 * 3600.0,
        backoff: tuple[float, float] = (0.05, 0.5),
        max_batch: int = 5000,
    ) -> None:
        self._conn_class, self._conn_kwargs, self._where = settings(url)
        self._node = node_id or secrets.token_hex(6)
        self._prefix = prefix.encode()
        self._nodes_key = self._prefix + b"nodes"
        self._rates = {
            Kind.SEND: (b"%d" % round(1e6 / policy.send_rate), b"%d" % policy.send_burst),
            Kind.TYPING: (
                b"%d" % round(1e6 / policy.typing_rate),
                b"%d" % max(1, round(policy.typing_rate)),
            ),
        }
        self._max_conns = b"%d" % policy.max_connections_per_user
        self._timeout, self._heartbeat, self._backoff = timeout, heartbeat, backoff
        if node_ttl < 2 * heartbeat:
            raise ValueError("node_ttl must be at least two heartbeats")
        self._node_ttl_ms = b"%d" % round(node_ttl * 1000)
        self._key_ttl_ms = b"%d" % round(4 * rotate * 1000)
        self._rotate, self._max_batch = rotate, max_batch
        self._me = b""
        """This node's current incarnation ('' before the first connection)."""
        self._shas: list[bytes] = []
        self._held = Held()
        """Connections held here, and solo users (see `limits_held`)."""
        self._leaving = False
        """`close` has sent LEAVE: no heartbeat or registration may bring us back."""
        self._announce: Callable[[str], None] = lambda user: None
        self._queue: deque[_Check] = deque()
        self._in_flight: list[_Check] = []
        self._wake = asyncio.Event()
        self._up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._allowed = self._refused = self._unanswered = self._reconnects = 0

    # ------------------------------------------------------------------ interface

    async def start(self, announce: Callable[[str], None]) -> None:
        if self._task is not None:
            raise RuntimeError("RedisLimits starts once")
        self._announce = announce
        self._task = asyncio.create_task(self._supervise(), name="fleet-limits")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3.0):
                await self._up.wait()
        if not self._up.is_set():
            log.warning("fleet limits: redis at %s unreachable; node limits apply", self._where)

    async def close(self) -> None:
        """Send what is queued (disconnects) and take this node's counts out of the
        fleet at once (within `timeout`), then stop."""
        if self._closed:
            return
        if self._up.is_set():
            self._leaving = True
            fut: asyncio.Future[float | None] = asyncio.get_running_loop().create_future()
            self._push(_Check(_Op.LEAVE, "", fut=fut))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._timeout):
                    await fut
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._unanswer(self._queue)
        self._queue.clear()

    def spread(self, user: str | None = None) -> None:
        self._held.spread(user)

    def take(self, kind: Kind, user: str) -> asyncio.Future[float | None] | None:
        if user in self._held.solo:  # this node's buckets are the fleet's
            return None
        if not self._up.is_set():
            self._unanswered += 1
            return None
        fut: asyncio.Future[float | None] = asyncio.get_running_loop().create_future()
        self._push(_Check(_Op.TAKE, user, kind, fut))
        return fut

    def refund(self, kind: Kind, user: str) -> None:
        if self._up.is_set() and user not in self._held.solo:
            self._push(_Check(_Op.REFUND, user, kind))

    async def connect(self, user: str) -> bool | None:
        if not self._up.is_set():
            self._unanswered += 1
            self._held.held(user)
            return None
        fut: asyncio.Future[float | None] = asyncio.get_running_loop().create_future()
        epoch = self._held.asking(user)
        self._push(_Check(_Op.CONNECT, user, fut=fut, epoch=epoch))
        try:
            got = await asyncio.shield(fut)
        except asyncio.CancelledError:  # counted all the same (see `_resolve`): undo it

            def undo(f: asyncio.Future[float | None]) -> None:
                if f.result() != 0.0:
                    self.disconnect(user)

            fut.add_done_callback(undo)
            raise
        return None if got is None else got != 0.0

    def disconnect(self, user: str) -> None:
        self._held.released(user)
        if self._up.is_set():
            self._push(_Check(_Op.DISCONNECT, user))

    def stats(self) -> FleetStats:
        return FleetStats(
            self._up.is_set(),
            len(self._held.solo),
            self._allowed,
            self._refused,
            self._unanswered,
            self._reconnects,
        )

    # ------------------------------------------------------------------ internals

    def _push(self, check: _Check) -> None:
        self._queue.append(check)
        self._wake.set()

    def _resolve(self, check: _Check, result: float | None, others: int = 1) -> None:
        """Answer one check (None: unanswered). A connection that was not refused is
        held from this moment: re-registration counts it. `others`: nodes besides
        this one that hold the user (a connect's)."""
        if check.op is _Op.CONNECT:
            counted = None if result is None else result != 0.0
            self._held.answered(check.user, counted, others, check.epoch)
        if check.fut is not None and not check.fut.done():
            check.fut.set_result(result)

    def _unanswer(self, checks: list[_Check] | deque[_Check]) -> None:
        for check in checks:
            if check.fut is not None:
                self._unanswered += 1
            self._resolve(check, None)

    async def _supervise(self) -> None:
        def connect() -> AbstractConnection:
            name = f"chatd-limits-{self._node}"
            return self._conn_class(**(self._conn_kwargs | {"client_name": name}))

        def lost() -> None:  # counted in `_serve`, which clears `_up` itself
            return None

        what = f"redis limits connection of {self._node}"
        await supervise(connect, self._serve, self._up, what, self._timeout, self._backoff, lost)

    async def _serve(self, conn: AbstractConnection) -> None:
        """One connection's life: scripts, a new incarnation, then round trips."""
        try:
            replies = await self._call(conn, [(b"SCRIPT", b"LOAD", s) for s in _SCRIPTS])
            self._shas = [sha for sha in replies if isinstance(sha, bytes)]
            await self._register(conn)
            if self._reconnects:
                log.info("fleet limits: redis back at %s", self._where)
            loop = asyncio.get_running_loop()
            next_beat = loop.time() + self._heartbeat
            next_rotate = loop.time() + self._rotate
            while True:
                if not self._queue:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(next_beat - loop.time(), 0.0)):
                            await self._wake.wait()
                now = loop.time()
                beat = now >= next_beat and not self._leaving
                if beat:
                    next_beat = now + self._heartbeat
                lapsed = await self._round_trip(conn, beat)
                if (lapsed or now >= next_rotate) and not self._leaving:
                    if lapsed:
                        log.warning("fleet limits: %s had lapsed: registering anew", self._me)
                    await self._register(conn)
                    next_rotate = now + self._rotate
        finally:
            if self._up.is_set() and not self._closed:
                self._reconnects += 1
                log.warning("fleet limits: redis lost; this node's limits apply meanwhile")
            self._up.clear()  # before anything is answered: new checks answer None
            self._unanswer(self._in_flight)
            self._in_flight = []
            self._unanswer(self._queue)
            self._queue.clear()

    async def _register(self, conn: AbstractConnection) -> None:
        """Take a new incarnation and count what this node holds under it: at once (the
        disconnects still queued are in `_held` already, and are dropped; checks made
        from now on queue behind this), then in Redis, then the old one is removed (so
        that one of them counts all along). Users held elsewhere too are announced
        (SPREAD); the others are solo here."""
        old, self._me = self._me, f"{self._node}/{secrets.token_hex(4)}".encode()
        held, epoch = self._held.registering()
        kept = [c for c in self._queue if c.op is not _Op.DISCONNECT]
        self._queue.clear()
        self._queue.extend(kept)
        self._up.set()
        await self._call(conn, [self._beat()])
        sha, nodes, ttl = self._shas[4], self._nodes_key, self._key_ttl_ms
        for i in range(0, len(held), self._max_batch):
            chunk = held[i : i + self._max_batch]
            cmds: list[tuple[bytes, ...]] = [
                (b"EVALSHA", sha, b"2", self._key(u), nodes, self._me, b"%d" % n, ttl, old)
                for u, n in chunk
            ]
            for (user, _n), reply in zip(chunk, await self._call(conn, cmds), strict=True):
                others = reply if isinstance(reply, int) else 1
                if others:
                    self._announce(user)
                self._held.registered(user, others, epoch)
        if old:
            await self._call(conn, [(b"ZREM", nodes, old)])
        me = self._me.decode()
        log.info("fleet limits: %s registered the connections of %d users", me, len(held))

    def _beat(self) -> tuple[bytes, ...]:
        return (b"EVALSHA", self._shas[3], b"1", self._nodes_key, self._me, self._node_ttl_ms)

    def _key(self, user: str) -> bytes:
        return self._prefix + b"conns:" + user.encode()

    def _command(self, c: _Check) -> tuple[bytes, ...]:
        if c.op is _Op.TAKE or c.op is _Op.REFUND:
            interval, burst = self._rates[c.kind]
            key = self._prefix + b"rl:" + c.kind.value.encode() + b":" + c.user.encode()
            how = b"1" if c.op is _Op.TAKE else b"-1"
            return (b"EVALSHA", self._shas[0], b"1", key, interval, burst, how)
        if c.op is _Op.CONNECT:
            nodes, ttl = self._nodes_key, self._key_ttl_ms
            key = self._key(c.user)
            return (b"EVALSHA", self._shas[1], b"2", key, nodes, self._me, self._max_conns, ttl)
        if c.op is _Op.DISCONNECT:
            return (b"EVALSHA", self._shas[2], b"1", self._key(c.user), self._me)
        return (b"ZREM", self._nodes_key, self._me)  # LEAVE

    async def _round_trip(self, conn: AbstractConnection, beat: bool) -> bool:
        """Send what is queued (and a heartbeat); True if the heartbeat found this
        incarnation lapsed."""
        n = min(len(self._queue), self._max_batch)
        self._in_flight = batch = [self._queue.popleft() for _ in range(n)]
        cmds = [self._command(c) for c in batch]
        if beat:
            cmds.append(self._beat())
        if not cmds:
            return False
        replies = await self._call(conn, cmds)
        try:
            for check, reply in zip(batch, replies, strict=False):
                self._answer(check, reply)
        finally:  # an answer that could not be read is unanswered
            self._unanswer([c for c in batch if c.fut is not None and not c.fut.done()])
            self._in_flight = []
        return beat and replies[-1] == 0

    def _answer(self, check: _Check, reply: object) -> None:
        if check.op is _Op.TAKE:  # 0: taken; else the µs until one would be
            n = reply if isinstance(reply, int) else 0
            self._refused += n > 0
            self._allowed += n == 0
            self._resolve(check, n / 1e6)
        elif check.op is _Op.CONNECT:  # [counted, other nodes holding the user]
            counted, others = reply if isinstance(reply, list) else (1, 1)
            self._refused += counted == 0
            self._allowed += counted != 0
            self._resolve(check, float(counted), others)
            if counted and others:  # tell the nodes that took it for solo
                self._announce(check.user)
        elif check.op is _Op.LEAVE:
            self._resolve(check, 0.0)

    async def _call(self, conn: AbstractConnection, cmds: list[tuple[bytes, ...]]) -> list[object]:
        """Send `cmds` in one write and read every reply, within `timeout`."""
        async with asyncio.timeout(self._timeout):
            await conn.send_packed_command(conn.pack_commands(cmds), check_health=False)
            return [await conn.read_response(timeout=math.inf) for _ in cmds]
