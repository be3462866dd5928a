"""The node's connection budget: how many sockets it holds, and who makes room.

Every accepted TCP connection holds an open file until it closes. A node may hold
`limit` of them (by default its open-file limit, RLIMIT_NOFILE, less a reserve for the
listening socket, the database, the logs and a burst of accepts); past the open-file
limit the kernel refuses `accept()`, and then nobody gets in, real users included.

A connection is *pending* from its accept until its `hello` succeeds (through the
WebSocket upgrade and after it); then it is *authenticated*. Pending connections may
hold `pending` of the budget at most. When a new connection finds the pending share
full, or the whole budget full, the node sheds the OLDEST pending connections: one that
was idle longest makes room for the newest, so a client that says `hello` at once gets
in even while thousands of idle sockets arrive, whether or not it shares their address
(carrier NAT, a balancer). Authenticated connections are never shed; when they alone
fill the budget, a new connection is closed at once.

No clock is involved: the upgrade and `hello` deadlines (`--open-timeout`,
`--hello-timeout`) close idle connections on their own; shedding only runs short of room.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("chatd.admission")

__all__ = ["Admission", "Budget", "Sheddable", "budget_for", "open_file_limit"]

RESERVE_MIN = 128
"""Open files kept out of the connection budget at least (also 1/8 of the limit): the
listening socket, the database and its pool, logs, and the sockets asyncio accepts in
one go (up to its backlog of 100) before the newest can shed the oldest."""

_LOG_EVERY = 10.0
"""Seconds between two log lines about shedding (the first shed is logged at once)."""


def open_file_limit() -> int:
    """This process's open-file limit (the soft RLIMIT_NOFILE)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else int(soft)


@dataclass(frozen=True, slots=True)
class Budget:
    limit: int
    """Connections held at most (pending and authenticated)."""
    pending: int
    """Of them, connections that have not said `hello` at most."""
    nofile: int
    """The open-file limit it was derived from (0: set directly)."""


def budget_for(max_connections: int, pending_share: float, nofile: int | None = None) -> Budget:
    """`max_connections` connections (0: the open-file limit less its reserve), of which
    `pending_share` (at least one) may be pending."""
    files = 0
    limit = max_connections
    if limit <= 0:
        files = open_file_limit() if nofile is None else nofile
        limit = max(1, files - max(RESERVE_MIN, files // 8))
    return Budget(limit, max(1, math.floor(limit * pending_share)), files)


class Sheddable(Protocol):
    def shed(self) -> str:
        """Close now (the socket's file is released at once); the stage it was in:
        "upgrade" (the WebSocket handshake) or "hello" (upgraded, no `hello` yet)."""
        ...


class Admission:
    """Counts the node's connections and sheds the oldest pending ones when room runs out.

    The connection calls `opened` when accepted, `authenticated` when its `hello`
    succeeds, and `closed` when its socket is gone."""

    def __init__(self, budget: Budget, on_shed: Callable[[str], None] | None = None) -> None:
        self.budget = budget
        self.open = 0
        """Connections held now, shed ones left out (their files close within a loop turn)."""
        self._pending: dict[Sheddable, None] = {}
        """Pending connections, oldest first (dicts keep insertion order)."""
        self._shed: set[Sheddable] = set()
        """Shed, their `closed` still to come."""
        self._on_shed = on_shed
        self.shed_count = 0
        self._logged_at = -math.inf
        self._unlogged: dict[str, int] = {}

    @property
    def pending(self) -> int:
        return len(self._pending)

    def opened(self, conn: Sheddable) -> None:
        self.open += 1
        self._pending[conn] = None
        budget = self.budget
        pending = self._pending
        while pending and (len(pending) > budget.pending or self.open > budget.limit):
            self._shed_one(next(iter(pending)))

    def authenticated(self, conn: Sheddable) -> None:
        self._pending.pop(conn, None)

    def closed(self, conn: Sheddable) -> None:
        if conn in self._shed:
            self._shed.discard(conn)
            return
        self._pending.pop(conn, None)
        self.open -= 1

    def _shed_one(self, conn: Sheddable) -> None:
        del self._pending[conn]
        self._shed.add(conn)
        self.open -= 1
        stage = conn.shed()
        self.shed_count += 1
        if self._on_shed is not None:
            self._on_shed(stage)
        self._unlogged[stage] = self._unlogged.get(stage, 0) + 1
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY:
            self._logged_at = now
            counts, self._unlogged = self._unlogged, {}
            log.warning(
                "shed %d connections that had not said hello (%d in the upgrade) to make "
                "room: %d open of %d, %d pending of %d",
                sum(counts.values()),
                counts.get("upgrade", 0),
                self.open,
                self.budget.limit,
                len(self._pending),
                self.budget.pending,
            )
