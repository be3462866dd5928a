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
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

__all__ = ["FleetLimits", "FleetStats", "Kind", "NodeOnly"]


class Kind(Enum):
    """What a rate counts (the bucket's name in Redis)."""

    SEND = "send"
    TYPING = "typing"


@dataclass(frozen=True, slots=True)
class FleetStats:
    up: bool
    """Answering now (False: the node's own limits decide)."""
    allowed: int
    refused: int
    unanswered: int
    """Checks the fleet did not answer (down, or a round trip failed): decided locally."""
    reconnects: int


class FleetLimits(Protocol):
    """Counts per user across the fleet. Every call is cheap and never raises: a check
    that cannot be answered answers None (the caller's own limit decides)."""

    async def start(self) -> None:
        """Connect; returns without raising when the fleet store is unreachable."""
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

    async def start(self) -> None:
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
        return FleetStats(False, 0, 0, 0, 0)
