"""`Positions`: finds the events a broker lost. Pub/sub is at most once; storage is the
truth. After the broker says it may have lost events (`resync`), and every `interval`
seconds, every local user's stream position in storage is handed to their sessions
(one query per 500 users, `Hub.check_positions`): a session that has not written that
far reads the rest back, unless the live feed brings it within the reorder window. The
periodic check catches a lost *last* event, which no later event would reveal."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from storage.base import StorageError, Store

from .hub import Hub

log = logging.getLogger("chatd.positions")

__all__ = ["Positions"]


class Positions:
    def __init__(self, hub: Hub, store: Store, interval: float | None) -> None:
        self._hub = hub
        self._store = store
        self._interval = interval
        """Seconds between periodic checks (None: only on resync, e.g. one node)."""
        self._due = False
        self._check: asyncio.Task[None] | None = None
        self._periodic: asyncio.Task[None] | None = None
        self.checks = 0
        """Checks run (for tests and metrics)."""

    def start(self) -> None:
        if self._interval is not None and self._periodic is None:
            self._periodic = asyncio.create_task(self._every(self._interval))

    def resync(self) -> None:
        """The broker's `Resync`: check every position soon (checks asked for while one
        runs are one more check after it)."""
        self._due = True
        if self._check is None or self._check.done():
            self._check = asyncio.create_task(self._run())

    async def _every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.resync()

    async def _run(self) -> None:
        while self._due:
            self._due = False
            try:
                users = await self._hub.check_positions(self._store)
            except StorageError as exc:
                log.warning("position check failed (retried at the next one): %s", exc)
                return
            self.checks += 1
            log.debug("position check of %d users", users)

    async def close(self) -> None:
        for task in (self._periodic, self._check):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._periodic = self._check = None
