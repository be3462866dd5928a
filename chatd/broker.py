"""The Broker interface: carries live events between nodes. Storage stays the truth.

A broker only carries; it may lose an event (a missed publish, a restart): a
session that then sees a gap in `cur` reads the missing events from storage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Broker", "Deliver", "LiveEvent"]


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


class Broker(Protocol):
    async def start(self, deliver: Deliver) -> None:
        """Connect; from now on events for subscribed users go to `deliver`."""

    async def subscribe(self, user: str) -> None:
        """Start receiving the user's events on this node (idempotent)."""

    async def unsubscribe(self, user: str) -> None:
        """Stop receiving them (idempotent)."""

    def publish(self, events: Sequence[tuple[str, LiveEvent]]) -> None:
        """Hand each (user, event) to every node subscribed to that user, in order.

        Returns at once and never raises (it runs in the done-callback of a
        write): a broker that must do I/O queues the events for its own task,
        and one that cannot deliver them drops them (see the module docstring)."""

    async def close(self) -> None: ...
