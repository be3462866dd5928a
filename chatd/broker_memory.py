"""LocalBroker: the in-process broker of a single node (the default)."""

from __future__ import annotations

from collections.abc import Sequence

from .broker import Deliver, LiveEvent

__all__ = ["LocalBroker"]


class LocalBroker:
    """Delivers synchronously to this process's hub. Nothing crosses processes."""

    def __init__(self) -> None:
        self._deliver: Deliver | None = None
        self._users: set[str] = set()

    async def start(self, deliver: Deliver) -> None:
        self._deliver = deliver

    async def subscribe(self, user: str) -> None:
        self._users.add(user)

    async def unsubscribe(self, user: str) -> None:
        self._users.discard(user)

    def publish(self, events: Sequence[tuple[str, LiveEvent]]) -> None:
        deliver = self._deliver
        if deliver is None:
            return
        for user, event in events:
            if user in self._users:
                deliver(user, event)

    async def close(self) -> None:
        self._deliver = None
        self._users.clear()
