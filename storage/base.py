"""The storage contract: what the server needs from its source of truth.

Vocabulary
- A *conversation* (`conv`) is the direct conversation of two distinct users.
  Its id is a deterministic opaque string (`conv_id(a, b)`), the same for both.
- `seq` numbers the messages of one conversation: 1, 2, 3, ... strictly
  increasing, no duplicates, also when several nodes write at once.
- Each user has one *stream* of events numbered by `cur` = 1, 2, 3, ... with no
  gaps and no reuse, in commit order: if an event with `cur` n is committed,
  every event of that user with `cur` < n is committed too (invariant 2).
  The stream holds a `msg` event for each message sent to the user and for
  each message sent by the user, and a `receipt` event for each forward move
  of either person's watermark in the user's conversations.
- Watermarks: per (user, conv), `delivered` and `read` are the highest `seq`
  of messages *to that user* that the user marked. They only move forward.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = [
    "ConvSummary",
    "Event",
    "HistoryPage",
    "MarkOutcome",
    "NotAMember",
    "ReceiptRecord",
    "SendOutcome",
    "StorageError",
    "StorageRejected",
    "StorageUnavailable",
    "Store",
    "StoreStats",
    "StoredMessage",
    "UptoTooHigh",
    "conv_id",
]

MarkKind = Literal["delivered", "read"]


@functools.lru_cache(maxsize=16384)
def conv_id(a: str, b: str) -> str:
    """Deterministic id of the direct conversation of users `a` and `b` (order-free).

    32 hex characters (128 bits of BLAKE2b over the sorted pair), so it fits the
    protocol's 128-character limit for opaque ids whatever the user ids' length.
    """
    lo, hi = (a, b) if a <= b else (b, a)
    return hashlib.blake2b(f"{lo}\n{hi}".encode(), digest_size=16).hexdigest()


class StorageError(Exception):
    """Root of every error raised by the `storage` package."""


class StorageUnavailable(StorageError):
    """The database cannot be reached or the transaction failed: nothing was stored."""


class StorageRejected(StorageError):
    """The database refused this one write (its data, not the database's health):
    nothing of it was stored, and the writes that shared its transaction were
    committed without it. Retrying it unchanged fails again: a server fault."""


class NotAMember(StorageError):
    """The user is not one of the two people of that conversation (or it has none)."""


class UptoTooHigh(StorageError):
    """A mark's `upto` is above the conversation's last `seq`."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    mid: int
    conv: str
    seq: int
    sender: str
    recipient: str
    cmid: str
    ts: int
    type: str
    body: str | bytes


@dataclass(frozen=True, slots=True)
class ReceiptRecord:
    conv: str
    kind: MarkKind
    upto: int
    by: str
    ts: int


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a user's stream: exactly one of `message` / `receipt` is set."""

    user: str
    cur: int
    message: StoredMessage | None = None
    receipt: ReceiptRecord | None = None


@dataclass(frozen=True, slots=True)
class SendOutcome:
    message: StoredMessage
    sender_cur: int
    """The message's `cur` in the sender's stream."""
    recipient_cur: int
    """The message's `cur` in the recipient's stream."""
    dup: bool
    """True when (sender, cmid) was already stored: nothing new was stored, and
    `message` / curs are the original ones."""


@dataclass(frozen=True, slots=True)
class MarkOutcome:
    receipt: ReceiptRecord | None
    """None when the watermark did not move (upto at or below it, after capping)."""
    marker_cur: int = 0
    """The receipt's `cur` in the marking user's stream (0 when receipt is None)."""
    peer: str = ""
    """The other person of the conversation."""
    peer_cur: int = 0
    """The receipt's `cur` in the other person's stream (0 when receipt is None)."""
    watermark: int = 0
    """The marking user's watermark of this kind in the conversation after the mark,
    as committed: a later mark with `upto` at or below it changes nothing."""


@dataclass(frozen=True, slots=True)
class HistoryPage:
    conv: str
    messages: Sequence[StoredMessage]
    """Newest first."""
    more: bool
    delivered: int
    """The other person's delivered watermark."""
    read: int
    """The other person's read watermark."""


@dataclass(frozen=True, slots=True)
class ConvSummary:
    conv: str
    peer: str
    seq: int
    ts: int
    unread: int
    delivered: int
    """The other person's delivered watermark."""
    read: int
    """The other person's read watermark."""


@dataclass(frozen=True, slots=True)
class StoreStats:
    """What a store has committed so far, for metrics."""

    batched_ops: int
    """Writes (sends and marks) in the committed transactions."""
    batch_bounds: tuple[int, ...]
    """Upper bounds of the buckets of `batch_sizes` (writes per transaction)."""
    batch_sizes: tuple[int, ...]
    """Transactions by size: `batch_sizes[i]` counts those with
    batch_bounds[i-1] < writes <= batch_bounds[i]; the last one counts those above all."""

    commit_bounds: tuple[float, ...] = ()
    """Upper bounds (seconds) of the buckets of `commit_counts`."""
    commit_counts: tuple[int, ...] = ()
    """Committed transactions by how long their commit took (the last: above all)."""
    commit_seconds: float = 0.0
    """The time those commits took, in all."""
    retries: int = 0
    """Transactions tried again after a deadlock, a serialization failure or a lost
    unique race (PostgreSQL, several writers)."""
    failures: tuple[tuple[str, int], ...] = ()
    """Failed transactions by kind: `unavailable` (the database failed: nothing stored)
    and `rejected` (it refused a value: run again one write at a time)."""
    locked: int = 0
    """PostgreSQL: batches done the locked way at once, because recent checked writes
    conflicted (storage/batch_pg.py, `Way`)."""
    conflicts: int = 0
    """PostgreSQL: batches whose checked write found a row moved by another commit
    since it was planned, done again the locked way (storage/batch_pg.py)."""

    @property
    def batches(self) -> int:
        """Transactions committed."""
        return sum(self.batch_sizes)


class Store(Protocol):
    """The source of truth. Every method may raise `StorageUnavailable`."""

    async def open(self) -> None:
        """Connect and start the group-commit writer. Migrations are separate."""

    async def close(self) -> None:
        """Finish (or fail with StorageUnavailable) every queued write, then disconnect."""

    def send(
        self, sender: str, recipient: str, cmid: str, body: str | bytes, type: str, ts: int
    ) -> asyncio.Future[SendOutcome]:
        """Store a message durably, once per (sender, cmid): the write is queued at once
        (or StorageUnavailable raised) and the future ends when it is committed.

        Assigns `seq` in the conversation and one `cur` in each of the two
        streams. A repeated (sender, cmid) ends with the original and dup=True,
        whatever its recipient and body. Group commit: concurrent writes share
        one transaction. `sender != recipient` is the caller's job. A future (not
        a coroutine) so that the server's hot path adds a done-callback instead of
        running a task per message; `await store.send(...)` works the same.
        """

    def mark(
        self, user: str, conv: str, kind: MarkKind, upto: int, ts: int
    ) -> asyncio.Future[MarkOutcome]:
        """Move `user`'s watermark of `kind` in `conv` forward, durably (a future, like
        `send`).

        Fails with NotAMember when `user` is not in `conv`, UptoTooHigh when
        `upto` > the conversation's last seq (0 for none). Otherwise `upto` is
        capped at the last seq of a message sent *to* `user`; if the capped
        value is not above the current watermark nothing is stored and
        MarkOutcome(receipt=None) is the result. A `read` also raises the
        delivered watermark to at least the same value, storing a single
        `read` receipt event in each of the two streams. Unread counts drop
        accordingly. Shares the group commit with `send`.
        """

    def stats(self) -> StoreStats:
        """Counters of the writes committed so far (read by metrics at scrape time)."""

    async def find_sent(self, sender: str, cmid: str) -> SendOutcome | None:
        """The stored message of (sender, cmid) as a dup outcome, or None."""

    async def last_cur(self, user: str) -> int:
        """The newest `cur` of the user's stream (0 for a user with no events)."""

    async def last_curs(self, users: Sequence[str]) -> dict[str, int]:
        """`last_cur` of many users in one query (a node's periodic position check):
        users with no events are left out."""

    async def events(self, user: str, after: int, upto: int, limit: int) -> list[Event]:
        """Events of `user` with after < cur <= upto, in cur order, at most `limit`."""

    async def undelivered(self, user: str, after: int, upto: int, limit: int) -> list[Event]:
        """`msg` events of messages *to* `user` with after < cur <= upto whose seq is
        above the user's delivered watermark of their conversation, in cur order,
        at most `limit` (the catch-up of a device without `since`)."""

    async def history(self, user: str, peer: str, before: int | None, limit: int) -> HistoryPage:
        """Messages between user and peer with seq < before (None: newest), newest first."""

    async def convs(self, user: str, limit: int) -> list[ConvSummary]:
        """The user's conversations, newest last message first (tie: stored later first);
        `unread` counts messages to the user above the user's own read mark."""

    async def ping(self) -> None:
        """Raise StorageUnavailable unless the database answers (health checks)."""
