"""The stream sequencer of one connection: what to write next, so that every event of the
user's stream goes out in `cur` order, each `cur` exactly once. Sans-I/O: no asyncio, no
sockets, no clock (the time is passed in), no storage (the caller reads what `gap()` asks
for and hands it to `fill()`).

What it merges, for one connection:

- *live events* from the broker (`LIVE`), stored or not (`cur` 0: typing, written as is);
- *own results*: this connection's `sent` reply to its own message (`OWN_SENT`), which
  takes the place of the `msg` event of that message, and a receipt of its own mark
  followed by the mark's `ok` (`OWN_MARK`);
- *replies* that are not stream events (`PLAIN`: pong, errors, history pages);
- *fills*: stored events read back for a gap.

The rules:

- `last` is the highest `cur` written. An event at `last + 1` is written; one at or
  below `last` was written already (a duplicate, or a fill got there first) and is
  dropped, except that an own result still owes its reply (`sent`, or the mark's `ok`).
- An event above `last + 1` means events below it are missing: a publish not arrived
  yet (two nodes may deliver out of order) or lost. It is held; once it has waited the
  reorder `window`, `gap()` names the range to read from storage, and `fill()` writes
  those events and releases what they unblock. With a window of 0 (one node: the local
  broker delivers in commit order) a gap is due at once.
- A *position* (`POSITION`, from a periodic check or a broker's resync: storage holds
  the user's events up to `cur - 1`) is held like an event at `cur`: if the live feed
  does not reach it within the window, `gap()` names the missing range. It writes
  nothing itself. This is how a lost *last* event, which no later event would reveal,
  is found.
- A fill that meets this connection's own message still waiting for its reply is
  handed the `sent` frame by the caller (`own=True`): it is written in the message's
  place, and the `OWN_SENT` item that arrives later writes nothing.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import NamedTuple

from .errors import ChatdError

__all__ = [
    "LIVE",
    "OWN_MARK",
    "OWN_SENT",
    "PLAIN",
    "POSITION",
    "Gap",
    "Item",
    "Sequencer",
    "StreamGap",
]

PLAIN, LIVE, OWN_SENT, OWN_MARK, POSITION = range(5)
"""Item kinds (see the module docstring)."""

Item = tuple[int, int, bytes, bytes | None, str]
"""(kind, cur, data, after, cmid): `after` is written right after `data` (a mark's `ok`);
`cmid` names this connection's own message of an `OWN_SENT` item ("" for none). A plain
tuple: one is made per frame on the hot path."""


class Gap(NamedTuple):
    """Stored events with after < cur <= upto are missing: read them, then `fill()`."""

    after: int
    upto: int


class StreamGap(ChatdError):
    """Storage handed `fill()` an event that is not the next `cur`: the stream has a hole."""


class Sequencer:
    __slots__ = ("_gap_since", "_held", "_n", "_written_own", "last", "settled", "window")

    def __init__(self, last: int = 0, window: float = 0.0) -> None:
        self.last = last
        """The highest `cur` written."""
        self.window = window
        """Seconds an event above `last + 1` waits for the missing ones before a fill."""
        self.settled: list[str] | None = None
        """cmids of own `sent` items written (or made moot) since the caller last took
        them: it stops keeping their replies for fills (made on demand)."""
        self._held: list[tuple[int, int, int, float, Item]] = []
        """Items above `last + 1`: a heap of (cur, own first, arrival, time, item)."""
        self._n = 0
        self._gap_since = 0.0
        """When the oldest held item arrived (meaningful while one is held)."""
        self._written_own: set[int] | None = None
        """`cur`s whose own `sent` a fill wrote early (rare: made on demand)."""

    # ---------------------------------------------------------------- input

    def ready(self, item: Item) -> bool:
        """True when `push(item)` writes it at once with nothing held: a caller may then
        write its frames without queueing them (the hot path)."""
        if self._held:
            return False
        return item[0] == PLAIN or item[1] == 0 or item[1] <= self.last + 1

    def push(self, item: Item, now: float) -> list[bytes]:
        """The frames to write now for `item`, in order (with the held items it releases);
        an item above `last + 1` is held and gives none yet."""
        kind, cur = item[0], item[1]
        if kind == PLAIN or cur == 0:
            return [item[2]]
        if cur > self.last + 1:
            self._hold(item, now)
            return []
        out = self._emit(item)
        if self._held:
            self._release(out)
        return out

    def gap(self, now: float) -> Gap | None:
        """The stored events to read now, or None: some are missing below a held item
        that has waited the reorder window."""
        held = self._held
        if not held or now < self._gap_since + self.window:
            return None
        return Gap(self.last, held[0][0] - 1)

    def deadline(self) -> float | None:
        """When `gap()` will name a range (None: nothing is held)."""
        return self._gap_since + self.window if self._held else None

    def fill(self, events: Iterable[tuple[int, bytes, bool]]) -> list[bytes]:
        """The frames for stored events read for a gap, given in `cur` order as (cur,
        frame, own): `own` when `frame` is this connection's own `sent` reply for the
        message stored at `cur`. Each `cur` above `last` is written once; then the held
        items they release. Raises StreamGap when an event skips a `cur`."""
        out: list[bytes] = []
        for cur, frame, own in events:
            if cur <= self.last:
                continue
            if cur != self.last + 1:
                raise StreamGap(f"events {self.last + 1}..{cur - 1} missing from storage")
            self.last = cur
            out.append(frame)
            if own:
                if self._written_own is None:
                    self._written_own = set()
                self._written_own.add(cur)
        if self._held:
            self._release(out)
        return out

    def take_settled(self) -> list[str]:
        """The cmids of own `sent` items settled since the last call (see `settled`)."""
        settled, self.settled = self.settled or [], None
        return settled

    # ---------------------------------------------------------------- internals

    def _emit(self, item: Item) -> list[bytes]:
        """Frames of an item at or below `last + 1`."""
        kind, cur, data, after, cmid = item
        if kind == POSITION:
            return []  # the events below it are written: nothing is missing
        if kind == OWN_SENT and cmid:
            if self.settled is None:
                self.settled = []
            self.settled.append(cmid)
        if cur <= self.last:
            # Written already (catch-up or fill). An own result still owes its reply.
            if kind == OWN_SENT:
                written = self._written_own
                if written is not None and cur in written:
                    written.discard(cur)
                    return []
                return [data]
            if kind == OWN_MARK and after is not None:
                return [after]
            return []
        self.last = cur
        return [data] if after is None else [data, after]

    def _hold(self, item: Item, now: float) -> None:
        if not self._held:
            self._gap_since = now
        self._n += 1
        own_first = 0 if item[0] in (OWN_SENT, OWN_MARK) else 1
        heapq.heappush(self._held, (item[1], own_first, self._n, now, item))

    def _release(self, out: list[bytes]) -> None:
        """Append the frames of the held items that are no longer above `last + 1`."""
        held = self._held
        while held and held[0][0] <= self.last + 1:
            out.extend(self._emit(heapq.heappop(held)[4]))
        if held:
            self._gap_since = min(entry[3] for entry in held)
