"""LocalBroker: the in-process broker of a single node (the default)."""

from __future__ import annotations

from collections.abc import Sequence

from .broker import BrokerStats, Deliver, LiveEvent, Resync

__all__ = ["LocalBroker"]


class LocalBroker:
    """Delivers synchronously to this process's hub. Nothing crosses processes, nothing
    is lost, so `resync` is never called."""

    def __init__(self) -> None:
        self._deliver: Deliver | None = None
        self._users: set[str] = set()
        self._published = 0
        self._received = 0
        self._dropped = 0

    async def start(self, deliver: Deliver, resync: Resync | None = None) -> None:
        self._deliver = deliver

    async def subscribe(self, user: str) -> None:
        self._users.add(user)

    async def unsubscribe(self, user: str) -> None:
        self._users.discard(user)

    def publish(self, events: Sequence[tuple[str, LiveEvent]]) -> None:
        deliver = self._deliver
        if deliver is None:
            self._dropped += len(events)
            return
        self._published += len(events)
        for user, event in events:
            if user in self._users:
                self._received += 1
                deliver(user, event)

    async def ping(self) -> None:
        return None

    def stats(self) -> BrokerStats:
        return BrokerStats(
            published=self._published,
            received=self._received,
            dropped=self._dropped,
            channels=len(self._users),
        )

    async def close(self) -> None:
        self._deliver = None
        self._users.clear()
