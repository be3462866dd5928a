"""`Subscriptions`: which users' channels one node wants, which it has asked Redis for,
and the `subscribe` calls waiting for Redis to confirm them. Bookkeeping only: the
`RedisBroker` sends what `reconcile()` returns and feeds back what Redis confirms.

A desired-state set reconciled by one task: `want`/`unwant` set a user's *wanted* state
and mark it dirty; `reconcile` compares wanted with *sent* (Redis' state once every
command sent is processed) for each dirty user and gives the differences. Each command
sent for a user is queued with the `subscribe` calls it answers, and Redis'
confirmations, in order, pop that queue (`confirmed`): the last call for a user decides,
whatever the interleaving, and a `subscribe` returns when the SUBSCRIBE sent after it
(or one still in force) is confirmed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Subscriptions", "resolve"]

log = logging.getLogger("chatd.broker")

_Pending = tuple[bool, list["asyncio.Future[None]"]]
"""A command sent for a user (True: SUBSCRIBE) and the `subscribe` calls it answers."""


def resolve(futures: list[asyncio.Future[None]], exc: BaseException | None = None) -> None:
    for fut in futures:
        if not fut.done():
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)


@dataclass(slots=True, eq=False)
class _Chan:
    """One user's subscription: wanted, sent, and the commands not yet confirmed."""

    want: bool = False
    sent: bool = False
    pending: deque[_Pending] = field(default_factory=deque)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    """`subscribe` calls waiting for a SUBSCRIBE to be sent."""

    def idle(self) -> bool:
        return not (self.want or self.sent or self.pending or self.waiters)


class Subscriptions:
    def __init__(self, prefix: bytes, on_change: Callable[[], None]) -> None:
        self.prefix = prefix
        """Channel name = prefix + user."""
        self._on_change = on_change
        """Wakes the task that sends what `reconcile` returns."""
        self._chans: dict[str, _Chan] = {}
        self._dirty: dict[str, None] = {}

    def wants(self, user: str) -> bool:
        ch = self._chans.get(user)
        return ch is not None and ch.want

    def count(self) -> int:
        """Users wanted now."""
        return sum(1 for ch in self._chans.values() if ch.want)

    def want(self, user: str) -> asyncio.Future[None] | None:
        """Want the user's channel: a future that ends when Redis confirms it, or None
        when a confirmed SUBSCRIBE is in force and nothing was sent since."""
        ch = self._chans.get(user)
        if ch is None:
            ch = self._chans[user] = _Chan()
        ch.want = True
        if ch.sent and not ch.pending:
            return None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if ch.sent:
            ch.pending[-1][1].append(fut)  # the last command sent is this SUBSCRIBE
        else:
            ch.waiters.append(fut)
            self._mark(user)
        return fut

    def unwant(self, user: str) -> None:
        ch = self._chans.get(user)
        if ch is not None and ch.want:
            ch.want = False
            self._mark(user)

    def reset(self) -> None:
        """A new connection: Redis holds nothing. Every wanted user is to be subscribed
        again, and the calls waiting for a confirmation wait for that one."""
        for user, ch in list(self._chans.items()):
            for _sub, futs in ch.pending:
                ch.waiters.extend(futs)
            ch.pending.clear()
            ch.sent = False
            if ch.want:
                self._mark(user)
            else:
                resolve(ch.waiters)
                del self._chans[user]

    def reconcile(self) -> tuple[list[bytes], list[bytes]]:
        """The channels to subscribe and to unsubscribe for the users marked dirty."""
        subs: list[bytes] = []
        unsubs: list[bytes] = []
        dirty, self._dirty = self._dirty, {}
        for user in dirty:
            ch = self._chans.get(user)
            if ch is None:
                continue
            if ch.want != ch.sent:
                ch.sent = ch.want
                ch.pending.append((ch.want, ch.waiters if ch.want else []))
                (subs if ch.want else unsubs).append(self.prefix + user.encode())
                if ch.want:
                    ch.waiters = []
            if not ch.want:  # subscribe calls superseded by an unsubscribe return
                resolve(ch.waiters)
                ch.waiters.clear()
                if ch.idle():
                    del self._chans[user]
        return subs, unsubs

    def confirmed(self, channel: bytes, subscribed: bool) -> None:
        """Redis confirmed a (UN)SUBSCRIBE of `channel` (its replies come in order)."""
        if not channel.startswith(self.prefix):
            return  # not a user's channel
        user = channel[len(self.prefix) :].decode()
        ch = self._chans.get(user)
        if ch is None or not ch.pending:
            log.warning("unexpected %s confirmation", "subscribe" if subscribed else "unsubscribe")
            return
        sent, futs = ch.pending.popleft()
        if sent != subscribed:
            log.warning("subscription confirmations of %r out of order", user)
        resolve(futs)
        if ch.idle():
            del self._chans[user]

    def close(self, exc: BaseException) -> None:
        """Fail every waiting `subscribe` with `exc`; forget everything."""
        for ch in self._chans.values():
            resolve(ch.waiters + [f for _sub, futs in ch.pending for f in futs], exc)
        self._chans.clear()

    def _mark(self, user: str) -> None:
        self._dirty[user] = None
        self._on_change()
