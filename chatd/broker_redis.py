"""RedisBroker: live events between many chatd nodes through Redis pub/sub.

Channels: one per user, `{prefix}u:{user}` (Centrifugo's personal channels),
subscribed by the nodes that have sessions of the user. A publisher needs to
know nothing of where a user is: Redis fans out, and a subscription it has
confirmed is in force for every later PUBLISH. Per-node inboxes would need a
presence registry (user -> nodes) read on every publish (a second round trip,
or a cache that is stale exactly when a user moves: a lost event) and cleaned
after crashed nodes; Redis keeps a million channels cheaply. `{prefix}ctl`
carries resync notices.

Subscriptions: ONE pub/sub connection per node; which channels it wants, has asked
for and has had confirmed is `broker_subs.Subscriptions` (a desired-state set: the
last `subscribe`/`unsubscribe` of a user decides, whatever the interleaving). Its
writer wakes once per loop iteration and sends the differences as
SUBSCRIBE/UNSUBSCRIBE of at most 512 channels in one write.

Publishing: `publish` queues (user, event, time.time()) (beyond `max_queue`,
events are dropped and counted) for the flusher, which sends all that is queued
as PUBLISH commands, in order, in one pipelined round trip on a connection of
its own: per-user order holds. Envelope: msgpack `[node, ts, cur, data]`. No
local fast path: this node's own events come back through Redis, in one order
with every other node's.

Faults: a supervisor per connection reconnects with jittered backoff (0.05 s
doubling to 0.5 s: a node tries twice a second at most, and is back within about
0.5 s of Redis; loadtest/blink.py measured 1.0-1.8 s with a 2 s cap). The pub/sub
link is PINGed every `ping_interval`; silence for `ping_interval + timeout` is a dead
link. Back, it resubscribes every wanted
channel in batches, waits for a PING sent behind them, and calls `resync`. A
failed publish round trip drops its batch (counted); once one works again a
notice goes on `{prefix}ctl` (at most once per `ping_interval`) and every node,
this one too, calls `resync`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import msgpack
from redis.asyncio.connection import AbstractConnection

from .broker import BrokerStats, BrokerUnavailable, Deliver, LiveEvent, Resync
from .broker_subs import Subscriptions, resolve
from .redis_link import settings, supervise, why

__all__ = ["SUBSCRIBE_BATCH", "RedisBroker"]

log = logging.getLogger("chatd.broker")

SUBSCRIBE_BATCH = 512
"""Channels per SUBSCRIBE/UNSUBSCRIBE command (as Centrifugo)."""

_READY = b"r"
_PUBSUB, _PUBLISH = "pubsub", "publish"


def _unpack(payload: bytes) -> tuple[float, LiveEvent] | None:
    """The (publish time, event) of an envelope, or None if it is not one."""
    try:
        _node, ts, cur, data = msgpack.unpackb(payload)
    except Exception:  # not msgpack, or not four items
        return None
    if isinstance(ts, int | float) and isinstance(cur, int) and isinstance(data, bytes):
        return float(ts), LiveEvent(cur, data)
    return None


class RedisBroker:
    """The Broker of many nodes on one Redis (see the module docstring)."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "chatd:",
        node_id: str | None = None,
        max_queue: int = 100_000,
        max_batch: int = 10_000,
        timeout: float = 3.0,
        ping_interval: float = 1.0,
        backoff: tuple[float, float] = (0.05, 0.5),
        on_lag: Callable[[float], None] | None = None,
    ) -> None:
        self.node_id = node_id or secrets.token_hex(6)
        if not self.node_id.isprintable() or " " in self.node_id:
            raise ValueError(f"node id {self.node_id!r}: printable, without spaces")
        self._conn_class, self._conn_kwargs, self._where = settings(url)
        self._user_prefix = f"{prefix}u:".encode()
        self._ctl = f"{prefix}ctl".encode()
        self._max_queue, self._max_batch = max_queue, max_batch
        self._timeout, self._ping_interval, self._backoff = timeout, ping_interval, backoff
        self.on_lag = on_lag
        """Called with the lag (seconds, publish to delivery) of each event received."""
        self._deliver: Deliver | None = None
        self._resync: Resync | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = self._link_was_up = self._overflowing = False
        self._up = {_PUBSUB: asyncio.Event(), _PUBLISH: asyncio.Event()}
        self._sub_wake, self._pub_wake = asyncio.Event(), asyncio.Event()
        self._drained = asyncio.Event()
        self._subs = Subscriptions(self._user_prefix, self._sub_wake.set)
        self._queue: deque[tuple[str, LiveEvent, float]] = deque()
        self._pings: list[asyncio.Future[None]] = []
        self._announced = 0
        """`dropped` as of the last resync notice sent."""
        self._published = self._received = self._dropped = self._reconnects = self._resyncs = 0
        self._last_rx = self._next_notice = self._lag_last = self._lag_max = 0.0

    # ------------------------------------------------------------------ interface

    async def start(self, deliver: Deliver, resync: Resync) -> None:
        """Connect both connections; raise BrokerUnavailable if Redis is not there."""
        if self._tasks or self._closed:
            raise RuntimeError("a RedisBroker starts once")
        self._deliver, self._resync = deliver, resync
        self._tasks = [
            asyncio.create_task(self._supervise(_PUBSUB, self._link), name="broker-pubsub"),
            asyncio.create_task(self._supervise(_PUBLISH, self._flusher), name="broker-publish"),
        ]
        try:
            async with asyncio.timeout(self._timeout):
                for up in self._up.values():
                    await up.wait()
        except TimeoutError:
            await self.close()
            raise BrokerUnavailable(f"redis at {self._where} unreachable") from None
        log.info("redis broker %s connected to %s", self.node_id, self._where)

    async def subscribe(self, user: str) -> None:
        if self._closed or not self._tasks:
            raise BrokerUnavailable("broker not running")
        fut = self._subs.want(user)
        if fut is not None:
            await self._confirmed(fut, f"SUBSCRIBE of {user!r}")

    async def unsubscribe(self, user: str) -> None:
        self._subs.unwant(user)

    def publish(self, events: Sequence[tuple[str, LiveEvent]]) -> None:
        try:
            if self._closed or not self._tasks:
                self._dropped += len(events)
                return
            room = max(self._max_queue - len(self._queue), 0)
            if len(events) > room:
                self._dropped += len(events) - room
                if not self._overflowing:
                    self._overflowing = True
                    log.warning("broker queue full (%d events): dropping", self._max_queue)
                events = events[:room]
            ts = time.time()
            self._queue.extend((user, event, ts) for user, event in events)
            self._drained.clear()
            self._pub_wake.set()
        except Exception:  # never into the caller (a storage done-callback)
            log.exception("broker publish failed")

    async def ping(self) -> None:
        if self._closed or not self._tasks:
            raise BrokerUnavailable("broker not running")
        if not all(up.is_set() for up in self._up.values()):
            raise BrokerUnavailable(f"a redis connection of {self.node_id} is down")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings.append(fut)
        self._pub_wake.set()
        await self._confirmed(fut, "PING")

    async def _confirmed(self, fut: asyncio.Future[None], what: str) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await fut
        except TimeoutError:
            raise BrokerUnavailable(f"{what}: no answer from redis in {self._timeout}s") from None

    def stats(self) -> BrokerStats:
        return BrokerStats(
            self._published, self._received, self._dropped, self._reconnects, self._resyncs,
            len(self._queue), self._subs.count(), self._lag_last, self._lag_max,
        )  # fmt: skip

    async def close(self) -> None:
        """Flush what is queued (for up to `timeout`), then stop every task."""
        if self._closed:
            return
        self._closed = True
        if self._queue and self._up[_PUBLISH].is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._timeout):
                    await self._drained.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._dropped += len(self._queue)
        self._queue.clear()
        gone = BrokerUnavailable("broker closed")
        resolve(self._pings, gone)
        self._subs.close(gone)
        log.info("redis broker %s closed", self.node_id)

    # ------------------------------------------------------------------ connections

    async def _supervise(
        self, role: str, session: Callable[[AbstractConnection], Awaitable[None]]
    ) -> None:
        """Run `session` on a new connection each time the last one fails, with backoff."""
        name = f"chatd-{role}-{self.node_id}"

        def connect() -> AbstractConnection:
            return self._conn_class(**(self._conn_kwargs | {"client_name": name}))

        def lost() -> None:
            self._reconnects += 1

        what = f"redis {role} connection of {self.node_id}"
        await supervise(connect, session, self._up[role], what, self._timeout, self._backoff, lost)

    # ------------------------------------------------------------------ pub/sub link

    async def _link(self, conn: AbstractConnection) -> None:
        """One pub/sub connection's life: resubscribe all, then read, write and ping."""
        self._last_rx = asyncio.get_running_loop().time()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._read_link(conn))
                tasks.create_task(self._write_link(conn))
                tasks.create_task(self._keep_link(conn))
        finally:
            self._subs.reset()

    async def _write_link(self, conn: AbstractConnection) -> None:
        """Send SUBSCRIBE/UNSUBSCRIBE for what changed, once per wake-up, in one write."""
        cmds: list[tuple[bytes, ...]] = [(b"SUBSCRIBE", self._ctl)]
        ready = [(b"PING", _READY)]  # answered once all of the first round is done
        while True:
            self._sub_wake.clear()
            subs, unsubs = self._subs.reconcile()
            for name, chans in ((b"SUBSCRIBE", subs), (b"UNSUBSCRIBE", unsubs)):
                step = SUBSCRIBE_BATCH
                cmds += [(name, *chans[i : i + step]) for i in range(0, len(chans), step)]
            cmds, ready, sending = [], [], cmds + ready
            if sending:
                async with asyncio.timeout(self._timeout):
                    await conn.send_packed_command(conn.pack_commands(sending), check_health=False)
            await self._sub_wake.wait()

    async def _read_link(self, conn: AbstractConnection) -> None:
        loop = asyncio.get_running_loop()
        while True:
            msg = await conn.read_response(timeout=math.inf)
            self._last_rx = loop.time()
            if not isinstance(msg, list) or len(msg) < 2:
                continue
            kind = msg[0]
            if kind == b"message" and len(msg) == 3:
                self._on_message(msg[1], msg[2])
            elif kind in (b"subscribe", b"unsubscribe"):
                self._subs.confirmed(msg[1], kind == b"subscribe")
            elif kind == b"pong" and msg[1] == _READY:  # all resubscribed
                self._up[_PUBSUB].set()
                if self._link_was_up:
                    log.info("redis pubsub connection of %s back: resync", self.node_id)
                    self._call_resync()
                self._link_was_up = True

    async def _keep_link(self, conn: AbstractConnection) -> None:
        """PING every `ping_interval`; fail the link after `ping_interval + timeout` of silence."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._ping_interval)
            silent = loop.time() - self._last_rx
            if silent > self._ping_interval + self._timeout:
                raise TimeoutError(f"redis silent for {silent:.1f}s")
            async with asyncio.timeout(self._timeout):
                await conn.send_command(b"PING", b"k", check_health=False)

    def _on_message(self, channel: bytes, payload: bytes) -> None:
        if channel == self._ctl:
            log.info("resync notice from another node's publisher (or ours)")
            self._call_resync()
            return
        user = channel[len(self._user_prefix) :].decode(errors="replace")
        if not self._subs.wants(user) or self._deliver is None:
            return
        got = _unpack(payload)
        if got is None:
            log.warning("not a broker envelope on %r: ignored", channel)
            return
        ts, event = got
        self._lag_last = lag = time.time() - ts
        self._lag_max = max(self._lag_max, lag)
        self._received += 1
        try:
            self._deliver(user, event)
            if self.on_lag is not None:
                self.on_lag(lag)
        except Exception:
            log.exception("broker deliver failed")

    def _call_resync(self) -> None:
        self._resyncs += 1
        if self._resync is not None:
            try:
                self._resync()
            except Exception:
                log.exception("broker resync callback failed")

    # ------------------------------------------------------------------ publishing

    async def _flusher(self, conn: AbstractConnection) -> None:
        """Send what is queued, one pipelined round trip at a time, until the link fails."""
        self._up[_PUBLISH].set()
        while True:
            self._pub_wake.clear()
            notice_in = self._notice_due_in()
            if self._queue or self._pings or notice_in == 0.0:
                await self._flush(conn)
                continue
            self._overflowing = False
            self._drained.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(notice_in):
                    await self._pub_wake.wait()

    def _notice_due_in(self) -> float | None:
        """Seconds until a resync notice may be sent: None if none is owed."""
        if self._dropped <= self._announced:
            return None
        return max(self._next_notice - time.monotonic(), 0.0)

    async def _flush(self, conn: AbstractConnection) -> None:
        """One round trip: PUBLISH each queued event (up to `max_batch`), the owed
        resync notice, and a PING if `ping` calls wait; a failure drops the batch."""
        batch = [self._queue.popleft() for _ in range(min(len(self._queue), self._max_batch))]
        pings, self._pings = self._pings, []
        dropped = self._dropped
        notice = self._notice_due_in() == 0.0
        node, prefix = self.node_id, self._user_prefix
        cmds: list[tuple[bytes, ...]] = [
            (b"PUBLISH", prefix + user.encode(), msgpack.packb([node, ts, ev.cur, ev.data]))
            for user, ev, ts in batch
        ]
        if notice:
            cmds.append((b"PUBLISH", self._ctl, msgpack.packb([node, time.time()])))
        if pings:
            cmds.append((b"PING",))
        try:
            async with asyncio.timeout(self._timeout):
                await conn.send_packed_command(conn.pack_commands(cmds), check_health=False)
                for _ in cmds:
                    await conn.read_response(timeout=math.inf)
        except BaseException as exc:
            self._dropped += len(batch)
            resolve(pings, BrokerUnavailable("redis publish connection failed"))
            if not isinstance(exc, asyncio.CancelledError):
                log.warning("broker dropped %d events: %s", len(batch), why(exc))
            raise
        self._published += len(batch)
        if notice:
            self._announced = dropped
            self._next_notice = time.monotonic() + self._ping_interval
        resolve(pings)
