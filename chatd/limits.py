"""Fleet limits: the per-user send and typing rates, and connections per user, counted
across every node of a fleet (the node's own buckets count only its own sessions).

One small interface, two implementations:

- `NodeOnly`: one node (the in-process broker), or a fleet run with
  `--fleet-limits off`: it never answers, so the node's own limits decide
  (`hub.UserState.sends`/`typing`, `Policy.max_connections_per_user`);
- `limits_redis.RedisLimits`: buckets and connection counts in Redis, checked by small
  Lua scripts, pipelined once per loop iteration; while Redis is unreachable it does not
  answer either, and the node's own limits decide (service goes on, the fleet-wide
  figures are up to N times the policy for N nodes meanwhile).

The node's own limits always run first: a node-local refusal is decided without a round
trip (what one node counted, the fleet counted too), and they are the fallback.

A user whose connections are all on one node (most users, most of the time) is *solo*
there: that node's buckets are the fleet's, and their checks make no round trip. The
connect check says whether another node holds the user; if one does, the node that
learns it announces `SPREAD` on the user's broker channel (every node with a session
of the user is subscribed before it asks), and from then on every node checks in the
fleet. A user who spreads may get one burst more at that moment (the fleet's bucket did
not see their solo sends); after it, the fleet's rates hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from .broker import LiveEvent

__all__ = ["SPREAD", "FleetLimits", "FleetStats", "Kind", "NodeOnly"]

SPREAD = LiveEvent(-1, b"\xc1spread")
"""The live event that says "this user is now on several nodes". The hub takes any
event with a negative `cur` for it; a node of an older version hands it to its
sessions, whose sequencers drop it as written already (cur -1 < 0), so a rolling
upgrade shows clients nothing."""


class Kind(Enum):
    """What a rate counts (the bucket's name in Redis)."""

    SEND = "send"
    TYPING = "typing"


@dataclass(frozen=True, slots=True)
class FleetStats:
    up: bool
    """Answering now (False: the node's own limits decide)."""
    solo: int
    """Users with connections on this node only: their checks make no round trip."""
    allowed: int
    refused: int
    unanswered: int
    """Checks the fleet did not answer (down, or a round trip failed): decided locally."""
    reconnects: int


class FleetLimits(Protocol):
    """Counts per user across the fleet. Every call is cheap and never raises: a check
    that cannot be answered answers None (the caller's own limit decides)."""

    async def start(self, announce: Callable[[str], None]) -> None:
        """Connect; returns without raising when the fleet store is unreachable.
        `announce(user)`: publish `SPREAD` to the user's channel."""
        ...

    def spread(self, user: str | None = None) -> None:
        """`user` (None: every user) may have connections on other nodes now: check
        in the fleet (a `SPREAD` event, or a broker reconnect, which may have lost some)."""
        ...

    async def close(self) -> None: ...

    def take(self, kind: Kind, user: str) -> asyncio.Future[float | None] | None:
        """One event of `kind` by `user`. None: no fleet check (decide locally, at
        once). A future: its result is 0.0 (allowed), the seconds until one would be
        allowed (refused: nothing taken), or None (unanswered: decide locally)."""
        ...

    def refund(self, kind: Kind, user: str) -> None:
        """Give back one `take` that turned out to cost nothing (a duplicate)."""
        ...

    async def connect(self, user: str) -> bool | None:
        """A new connection of `user` on this node: True (counted), False (the user
        has the most connections allowed across the fleet: refuse it), None
        (unanswered: counted locally, and in the fleet once it answers again).
        Every connection that was not refused is ended by one `disconnect`."""
        ...

    def disconnect(self, user: str) -> None: ...

    def stats(self) -> FleetStats: ...


class NodeOnly:
    """No fleet: the node's own limits are the only ones."""

    async def start(self, announce: Callable[[str], None]) -> None:
        return None

    def spread(self, user: str | None = None) -> None:
        return None

    async def close(self) -> None:
        return None

    def take(self, kind: Kind, user: str) -> asyncio.Future[float | None] | None:
        return None

    def refund(self, kind: Kind, user: str) -> None:
        return None

    async def connect(self, user: str) -> bool | None:
        return None

    def disconnect(self, user: str) -> None:
        return None

    def stats(self) -> FleetStats:
        return FleetStats(False, 0, 0, 0, 0, 0)
