"""`Inbox`: the messages of one connection, handed to the session's handler in order, or
kept while something holds them back (`holds`, a set of bits): before `welcome`, while
a read request is answered, while too many writes are in flight. With read flow
control (the socket stops being read when many wait) and the frame-rate limit. It
decodes nothing: the handler does."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from .connection import ChatConnection

__all__ = ["HOLD_FLEET", "HOLD_HELLO", "HOLD_READ", "HOLD_WRITES", "Inbox"]

HOLD_HELLO = 1
"""`welcome` is not sent yet: messages wait for the hello loop (`next()`)."""
HOLD_READ = 2
"""A read request is being answered: later messages wait for its answer."""
HOLD_WRITES = 4
"""Too many writes of this connection in flight: later messages wait."""
HOLD_FLEET = 8
"""The fleet's rate check of a message is awaited (see `limits`): later messages wait."""

_PAUSE_AT = 64
"""Waiting messages at which the socket stops being read (resumed at half)."""


class Inbox:
    __slots__ = (
        "_count",
        "_count_since",
        "_handle",
        "_on_flood",
        "_paused",
        "_queue",
        "_shut",
        "_wake",
        "holds",
        "max_rate",
        "ws",
    )

    def __init__(
        self,
        ws: ChatConnection,
        max_rate: int,
        handle: Callable[[bytes | str], None],
        on_flood: Callable[[], None],
    ) -> None:
        self.ws = ws
        self.max_rate = max_rate
        """Messages per second at most (counted over runs of this many)."""
        self._handle = handle
        """Acts on one message (from the protocol callback: it must not raise)."""
        self._on_flood = on_flood
        """Called for a message over `max_rate` (which is dropped)."""
        self.holds = HOLD_HELLO
        self._shut = False
        """The connection is closing: messages are dropped."""
        self._queue: deque[bytes | str] | None = None
        """Waiting messages (None while there are none: an idle connection keeps no
        deque, about 600 bytes)."""
        self._paused = False
        """The transport is not reading (the queue is long)."""
        self._wake: asyncio.Future[None] | None = None
        """Set while `next()` waits for a message."""
        self._count = 0
        """Messages received since `_count_since` (a run of max_rate at most)."""
        self._count_since = time.monotonic()

    def feed(self, data: bytes | str) -> None:
        """The connection's sink: one whole client message, from the protocol callback."""
        if self._shut:
            return
        count = self._count + 1
        if count > self.max_rate:  # more than N in a second?
            now = time.monotonic()
            if now - self._count_since < 1.0:
                self._on_flood()
                return
            count = 1  # this message starts the next run
            self._count_since = now
        self._count = count
        if not self.holds and not self._queue:
            self._handle(data)
        else:
            self._put(data)

    def hold(self, bit: int) -> None:
        self.holds |= bit

    def release(self, bit: int) -> None:
        """Drop a hold; hand the kept messages over, in order, until one holds them again."""
        self.holds &= ~bit
        while self._queue and not self.holds and not self._shut:
            self._handle(self.take())

    def _put(self, data: bytes | str) -> None:
        """Keep a message until it is taken; the socket stops being read past `_PAUSE_AT`."""
        if self._queue is None:
            self._queue = deque()
        self._queue.append(data)
        if len(self._queue) >= _PAUSE_AT and not self._paused:
            self._paused = True
            self.ws.pause_reading()
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def take(self) -> bytes | str:
        """The oldest waiting message (there must be one)."""
        queue = self._queue
        assert queue
        data = queue.popleft()
        if not queue:
            self._queue = None
        self._resume_if_short()
        return data

    async def next(self) -> bytes | str:
        """The next message, waiting for one; raises ConnectionClosed once the
        connection is closed."""
        while not self._queue:
            wake = self._wake = asyncio.get_running_loop().create_future()
            closed = asyncio.ensure_future(self.ws.wait_closed())
            try:
                await asyncio.wait((wake, closed), return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._wake = None
                closed.cancel()
            if not wake.done():
                raise self.ws.close_exception()
        return self.take()

    def shut(self) -> None:
        """Drop every waiting message and every later one; a paused socket is read again
        (so that a closing handshake can complete)."""
        self._shut = True
        self._queue = None
        self._resume_if_short()

    def _resume_if_short(self) -> None:
        if self._paused and (not self._queue or len(self._queue) < _PAUSE_AT // 2):
            self._paused = False
            self.ws.resume_reading()
