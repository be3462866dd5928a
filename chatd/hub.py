"""The local hub: which sessions of which users live on this node."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from storage.base import Store

from .broker import Broker, BrokerUnavailable, LiveEvent
from .config import Policy
from .errors import ChatdError
from .limits import FleetLimits, NodeOnly
from .ratelimit import TokenBucket

log = logging.getLogger("chatd.hub")

__all__ = ["MSG_TAG", "Hub", "Listener", "TooManyConnections", "UserState"]

MSG_TAG = b"\xa1t\xa3msg"
"""The bytes after the map header of an encoded `msg` frame ({"t": "msg", ...}): the hub
counts the `msg` frames it hands on without decoding them."""


class Listener(Protocol):
    """A connection of a user on this node (a session), as the hub sees it."""

    @property
    def user(self) -> str: ...

    def push_live(self, event: LiveEvent) -> None:
        """Take a live event of the user's stream (written in `cur` order)."""

    def check_position(self, stored: int) -> None:
        """Storage holds the user's stream up to `stored`: catch up if behind."""


class TooManyConnections(ChatdError):
    """The user already has the most connections allowed on this node."""


@dataclass(slots=True)
class UserState:
    """Per-user state on this node: sessions and rate limits (shared by devices)."""

    sends: TokenBucket
    typing: TokenBucket
    waste: TokenBucket
    """Duplicates and refused marks: free within it (see `Policy.waste_rate`)."""
    replay: TokenBucket
    """Bytes of catch-up (see `Policy.replay_rate`)."""
    reads: asyncio.Semaphore
    """Reads in flight (see `Policy.reads_per_user`)."""
    sessions: set[Listener] = field(default_factory=set)


class Hub:
    def __init__(self, broker: Broker, policy: Policy, fleet: FleetLimits | None = None) -> None:
        self._broker = broker
        self._fleet: FleetLimits = fleet if fleet is not None else NodeOnly()
        self._policy = policy
        self._users: dict[str, UserState] = {}
        self._resting: dict[str, tuple[float, UserState]] = {}
        """Users whose last connection closed, with when: their rate limits are kept
        until the buckets would have refilled, so reconnecting does not reset them."""
        self._rest_for = max(policy.send_burst / policy.send_rate, 1.0)
        """Seconds until an unused send bucket is full (typing's refills within 1 s)."""
        self.msg_pushes = 0
        """Live `msg` frames handed to sessions and not yet timed (metrics take them)."""

    def deliver(self, user: str, event: LiveEvent) -> None:
        """Broker callback: hand the event to every local session of the user."""
        state = self._users.get(user)
        if state is None:
            return
        if event.cur < 0:  # SPREAD, not for the sessions: see `limits`
            self._fleet.spread(user)
            return
        sessions = state.sessions
        for session in tuple(sessions):
            session.push_live(event)
        if event.cur and event.data.startswith(MSG_TAG, 1):
            self.msg_pushes += len(sessions)

    def user_state(self, user: str) -> UserState:
        state = self._users.get(user)
        if state is None:
            now = time.monotonic()
            resting = self._resting.pop(user, None)
            if resting is not None:
                state = resting[1]
                self._users[user] = state
                return state
            lim = self._policy
            state = UserState(
                sends=TokenBucket(lim.send_rate, lim.send_burst, now),
                typing=TokenBucket(lim.typing_rate, lim.typing_rate, now),
                waste=TokenBucket(lim.waste_rate, lim.waste_burst, now),
                replay=TokenBucket(lim.replay_rate, 4 * lim.replay_rate, now),
                reads=asyncio.Semaphore(lim.reads_per_user),
            )
            self._users[user] = state
        return state

    async def attach(self, session: Listener) -> UserState:
        """Register a session; it returns once the broker carries the user's events here.
        Raises TooManyConnections over the per-user limit (this node's count first, then
        the fleet's, see `limits`). A broker that cannot subscribe now does not stop it
        (see below)."""
        user = session.user
        most = self._policy.max_connections_per_user
        here = self._users.get(user)
        if here is not None and len(here.sessions) >= most:  # this node's count: at once
            raise TooManyConnections(user)
        state = self.user_state(user)
        state.sessions.add(session)
        counted: bool | None = False
        try:
            # Every attach waits for the subscription (idempotent): a second device that
            # attaches while the first one's SUBSCRIBE is on its way returns after it too.
            # Subscribed before the fleet counts it: a node that sees it there next
            # announces SPREAD on this channel, and it must arrive here (see `limits`).
            subscribed = True
            try:
                await self._broker.subscribe(user)
            except BrokerUnavailable:
                # Served all the same: the broker subscribes when it is back (and
                # resyncs); meanwhile the position checks bring this user's events.
                log.warning("user %r attached while the broker is unavailable", user)
                subscribed = False
            counted = await self._fleet.connect(user)  # None: unanswered, counted here
            if counted is False:
                raise TooManyConnections(user)
            if not subscribed:  # a SPREAD about this user may not reach this node
                self._fleet.spread(user)
        except BaseException:
            await self._detach(session, counted is not False)
            raise
        return state

    async def detach(self, session: Listener) -> None:
        await self._detach(session, True)

    async def _detach(self, session: Listener, counted: bool) -> None:
        state = self._users.get(session.user)
        if state is None or session not in state.sessions:
            return
        state.sessions.discard(session)
        if counted:
            self._fleet.disconnect(session.user)
        if not state.sessions:
            del self._users[session.user]
            now = time.monotonic()
            self._prune(now)
            self._resting[session.user] = (now, state)
            await self._broker.unsubscribe(session.user)

    def _prune(self, now: float) -> None:
        """Forget resting users whose buckets are full again (oldest first: insertion order)."""
        horizon = now - self._rest_for
        while self._resting:
            user, (since, _state) = next(iter(self._resting.items()))
            if since > horizon:
                break
            del self._resting[user]

    async def check_positions(self, store: Store, batch: int = 500) -> int:
        """Tell every local session where its user's stream ends in storage (one query
        per `batch` users): a session that has not written that far reads the rest
        back, unless the live feed brings it first. Finds events a broker lost, the last
        one included. Returns the number of users checked."""
        users = list(self._users)
        for i in range(0, len(users), batch):
            curs = await store.last_curs(users[i : i + batch])
            for user, cur in curs.items():
                state = self._users.get(user)
                if state is not None:
                    for session in tuple(state.sessions):
                        session.check_position(cur)
        return len(users)

    def users_online(self) -> int:
        return len(self._users)

    def device_counts(self) -> list[int]:
        """Sessions of each online user."""
        return [len(s.sessions) for s in self._users.values()]

    def session_count(self) -> int:
        return sum(len(s.sessions) for s in self._users.values())

    def sessions(self) -> list[Listener]:
        return [s for st in self._users.values() for s in st.sessions]
