"""The Broker interface: carries live events between nodes. Storage stays the truth.

A broker only carries; it may lose an event (a missed publish, a restart): a
session that then sees a gap in `cur` reads the missing events from storage, and
a broker that knows it may have lost events says so through `Resync`.

Implementations: `LocalBroker` (broker_memory.py, one node, the default) and
`RedisBroker` (broker_redis.py, many nodes on one Redis).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .errors import ChatdError

__all__ = ["Broker", "BrokerStats", "BrokerUnavailable", "Deliver", "LiveEvent", "Resync"]


@dataclass(frozen=True, slots=True)
class LiveEvent:
    """One frame for every connection of one user.

    `cur` > 0: a stored event at that place of the user's stream.
    `cur` == 0: ephemeral (typing): written at once, never stored or replayed.
    `data`: the encoded frame.
    """

    cur: int
    data: bytes


Deliver = Callable[[str, LiveEvent], None]
"""Called by a broker, on the event loop, for each event for a subscribed user."""

Resync = Callable[[], None]
"""Called by a broker, on the event loop, after it may have lost events (a reconnect,
a dropped publish anywhere): every local session should check its position against
storage. It must not block; it is never called by `LocalBroker`."""


class BrokerUnavailable(ChatdError):
    """The broker cannot carry events now (not started, closed, or its server is away)."""


@dataclass(frozen=True, slots=True)
class BrokerStats:
    """Counters since start, for metrics (each only grows, except `queued`, `channels`
    and `lag_last`)."""

    published: int = 0
    """Events handed on (to Redis, or to the local subscribers)."""
    received: int = 0
    """Events delivered to this node's `Deliver`."""
    dropped: int = 0
    """Events given to `publish` that were never handed on (queue full, a failed
    round trip, closed): storage has them; sessions find them by gap or resync."""
    reconnects: int = 0
    """Connections to the server lost and made again."""
    resyncs: int = 0
    """Times `Resync` was called."""
    queued: int = 0
    """Events waiting to be published now."""
    channels: int = 0
    """Users this node receives events for now."""
    lag_last: float = 0.0
    """Seconds from `publish` (on any node, by wall clock) to delivery, last event."""
    lag_max: float = 0.0
    """The largest such lag seen."""


class Broker(Protocol):
    async def start(self, deliver: Deliver, resync: Resync) -> None:
        """Connect; from now on events for subscribed users go to `deliver`, and
        `resync` is called whenever the broker may have lost some."""

    async def subscribe(self, user: str) -> None:
        """Start receiving the user's events on this node (idempotent).

        Returns once the subscription is in force: every event published after it
        returns reaches `deliver` (unless lost, which `resync` reports). Calls for
        one user may interleave with `unsubscribe` in any order: the last call made
        decides. Raises `BrokerUnavailable` if it cannot be confirmed in time (the
        wish stays: it is served when the server is back, followed by `resync`)."""

    async def unsubscribe(self, user: str) -> None:
        """Stop receiving them (idempotent; takes effect at once for `deliver`)."""

    def publish(self, events: Sequence[tuple[str, LiveEvent]]) -> None:
        """Hand each (user, event) to every node subscribed to that user, in order.

        Returns at once and never raises (it runs in the done-callback of a
        write): a broker that must do I/O queues the events for its own task,
        and one that cannot deliver them drops them (see the module docstring)."""

    async def ping(self) -> None:
        """Return if the broker can carry events now; raise `BrokerUnavailable` if not
        (for /readyz)."""

    def stats(self) -> BrokerStats:
        """The counters now."""

    async def close(self) -> None:
        """Stop every task and close every connection; later publishes are dropped."""
