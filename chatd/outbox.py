"""`Outbox`: what one connection writes, in order, and the task that writes it.

The I/O shell around the connection's `Sequencer` (which decides what goes out, in
`cur` order): it catches up on hello, queues frames, writes them to the socket, and
reads back from storage the events the sequencer says are missing.

While the writer task is idle (nothing queued), a frame that can go out without
waiting (the socket is writable and the sequencer writes it at once) is handed to the
connection straight from `push`, with no task switch: the frames of one loop
iteration leave in one socket write at its end (`ChatConnection.queue`). Otherwise
items queue here for the writer task, which takes them all at a time. Either way they
pass through the same sequencer, so the order is one.

A connection that does not read (its queue above `outbox_limit` frames or
`outbox_bytes` bytes) is closed 1013: it loses nothing, it resumes with `since`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from websockets.frames import CloseCode

from protocol import encode_map, synced_map
from storage.base import Event, StorageError, Store

from .connection import ChatConnection
from .metrics import Metrics
from .ratelimit import TokenBucket
from .sequencer import PLAIN, POSITION, Item, Sequencer, StreamGap
from .wire import encode_event

log = logging.getLogger("chatd.outbox")

__all__ = ["Outbox", "writer_close"]

_PAGE = 500
"""Stored events read per query (catch-up and fills)."""
_sleep = asyncio.sleep
"""How catch-up waits for its budget (a test watches it)."""
_OWN_WAIT = 30.0
"""Seconds a fill waits for this connection's own `sent` reply."""


class Outbox:
    __slots__ = (
        "_bytes",
        "_drained",
        "_items",
        "_on_overflow",
        "_pending",
        "_waiter",
        "closed",
        "conn_id",
        "limit_bytes",
        "limit_frames",
        "metrics",
        "replay",
        "seq",
        "store",
        "user",
        "writer",
        "ws",
    )

    def __init__(
        self,
        ws: ChatConnection,
        store: Store,
        metrics: Metrics,
        *,
        conn_id: int,
        limit_frames: int,
        limit_bytes: int,
        on_overflow: Callable[[], None],
        window: float = 0.0,
    ) -> None:
        self.ws = ws
        self.store = store
        self.metrics = metrics
        self.conn_id = conn_id
        self.limit_frames = limit_frames
        self.limit_bytes = limit_bytes
        self._on_overflow = on_overflow
        """Called once when a slow reader's queue passes its limit (it is emptied)."""
        self.user = ""
        self.replay: TokenBucket | None = None
        """The user's budget of catch-up bytes (shared by their connections)."""
        self.seq = Sequencer(window=window)
        self.closed = False
        """Nothing more is queued: the connection is being closed."""
        self.writer: asyncio.Task[None] | None = None
        self._items: list[Item] = []
        """Items queued for the writer task; it takes the whole list at a time (FIFO)."""
        self._bytes = 0
        """The size of the frames in `_items`."""
        self._waiter: asyncio.Future[None] | None = None
        """Set while the writer is idle; resolved by the next push."""
        self._drained: asyncio.Future[None] | None = None
        """Set while someone waits for the outbox to be written (before a close)."""
        self._pending: dict[str, asyncio.Future[bytes | None]] = {}
        """cmid -> the `sent` reply of this connection's own message not written yet (a
        fill writes it in the message's place)."""

    # ---------------------------------------------------------------- state

    @property
    def queued(self) -> int:
        """Items waiting for the writer task."""
        return len(self._items)

    @property
    def idle(self) -> bool:
        """The writer task waits for work (frames are written straight from `push`)."""
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    # ---------------------------------------------------------------- input

    def reply(self, data: bytes) -> None:
        """A frame that is not a stream event (an answer, an error, a pong)."""
        self.push((PLAIN, 0, data, None, ""))

    def push(self, item: Item) -> None:
        if self.closed:
            return
        waiter = self._waiter
        idle = waiter is not None and not waiter.done()
        # The writer is idle, so nothing is queued: write without waking it when
        # nothing can make the write wait (no task switch per frame on the hot path).
        if idle and self.ws.writable() and self.seq.ready(item):
            frames = self.seq.push(item, 0.0)
            if self.seq.settled:
                self._settle()
            if frames:
                self.ws.queue(frames)
            return
        self._items.append(item)
        self._bytes += len(item[2]) + (len(item[3]) if item[3] else 0)
        if idle:
            assert waiter is not None
            waiter.set_result(None)
            return
        if len(self._items) > self.limit_frames or self._bytes > self.limit_bytes:
            self._items.clear()
            self._bytes = 0
            self.closed = True
            self._on_overflow()

    def check(self, stored: int) -> None:
        """Storage holds this user's events up to `stored`: any not written yet are read
        back if the live feed does not bring them within the reorder window."""
        self.push((POSITION, stored + 1, b"", None, ""))

    def expect_own(self, cmid: str) -> asyncio.Future[bytes | None] | None:
        """A future for the `sent` reply of this connection's own message `cmid` (None
        when one is expected already: a resend while the first is in flight)."""
        if cmid in self._pending:
            return None
        fut: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._pending[cmid] = fut
        return fut

    def own_done(self, cmid: str, fut: asyncio.Future[bytes | None], sent: bytes | None) -> None:
        """The reply of own message `cmid` is known (None: there is none to write in its
        place, e.g. it failed or was a duplicate: it is forgotten)."""
        if not fut.done():
            fut.set_result(sent)
        if sent is None and self._pending.get(cmid) is fut:
            del self._pending[cmid]

    def _settle(self) -> None:
        for cmid in self.seq.take_settled():
            self._pending.pop(cmid, None)

    # ---------------------------------------------------------------- waiting

    async def written(self) -> None:
        """Until nothing is queued and the writer idle (its last frames handed to the
        socket below its buffer's high mark), or the writer has ended."""
        writer = self.writer
        if writer is None or writer.done() or (not self._items and self._waiter is not None):
            return
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()
        await asyncio.wait((self._drained, writer), return_when=asyncio.FIRST_COMPLETED)

    async def drain(self, timeout: float = 5.0) -> None:
        """`written()`, for `timeout` seconds at most (before a deliberate close)."""
        try:
            async with asyncio.timeout(timeout):
                await self.written()
        except TimeoutError:
            pass

    async def stop(self) -> None:
        """Cancel the writer task and wait for it."""
        self.closed = True
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    # ---------------------------------------------------------------- the writer task

    async def run(self, since: int | None, welcome_cur: int) -> None:
        """The writer task: catch up to `welcome_cur`, say `synced`, then write what
        is pushed, in order, until cancelled."""
        await self._catch_up(since, welcome_cur)
        self.seq.last = welcome_cur
        while True:
            if not self._items:
                await self._idle()
                continue
            items, self._items = self._items, []
            self._bytes = 0
            await self._write_items(items)

    async def _idle(self) -> None:
        """Wait for the next push; or, while the sequencer holds events above a gap, until
        the reorder window has passed, then fill the gap from storage."""
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)
        deadline = self.seq.deadline()
        wait = None if deadline is None else deadline - time.monotonic()
        if wait is not None and wait <= 0.0:
            gap = self.seq.gap(time.monotonic())
            if gap is not None:
                await self._fill(gap.upto)
            return
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            if wait is None:
                await waiter
            else:
                await asyncio.wait((waiter,), timeout=wait)  # never cancels the waiter
        finally:
            self._waiter = None

    async def _catch_up(self, since: int | None, welcome_cur: int) -> None:
        """Write exactly the events with since < cur <= welcome_cur (without `since`:
        the messages to this user not marked delivered), then `synced`."""
        store = self.store
        after = 0 if since is None else since
        while after < welcome_cur:
            if since is None:
                page = await store.undelivered(self.user, after, welcome_cur, _PAGE)
            else:
                page = await store.events(self.user, after, welcome_cur, _PAGE)
            if page:
                self.metrics.replayed["undelivered" if since is None else "resume"] += len(page)
                frames = [encode_event(ev) for ev in page]
                await self.ws.write(frames)
                await self._pace(sum(map(len, frames)))
            if len(page) < _PAGE:
                break
            after = page[-1].cur
        await self.ws.write([encode_map(synced_map(welcome_cur))])

    async def _pace(self, size: int) -> None:
        """Wait as long as the user's catch-up budget says after writing `size` bytes."""
        if self.replay is not None:
            wait = self.replay.spend(size, time.monotonic())
            if wait > 0.0:
                await _sleep(wait)

    async def _write_items(self, items: list[Item]) -> None:
        seq = self.seq
        out: list[bytes] = []
        for item in items:
            now = time.monotonic()
            out.extend(seq.push(item, now))
            if seq.settled:
                self._settle()
            gap = seq.gap(now)
            if gap is not None:
                if out:
                    await self.ws.write(out)
                    out = []
                await self._fill(gap.upto)
        if out:
            await self.ws.write(out)

    async def _fill(self, upto: int) -> None:
        """Write the stored events with last < cur <= upto (a gap in the live feed),
        and the held items they release."""
        seq = self.seq
        if seq.last < upto:
            self.metrics.gap_repairs += 1
        while seq.last < upto:
            page = await self.store.events(self.user, seq.last, upto, _PAGE)
            if not page:
                raise StreamGap(f"events {seq.last + 1}..{upto} missing from storage")
            self.metrics.gap_fills.inc(len(page))
            frames = seq.fill([await self._own_or_event(ev) for ev in page])
            if seq.settled:
                self._settle()
            await self.ws.write(frames)

    async def _own_or_event(self, ev: Event) -> tuple[int, bytes, bool]:
        """(cur, frame, own) for a stored event: this connection's own `sent` if it is
        waiting for one."""
        m = ev.message
        if m is not None and m.sender == self.user:
            fut = self._pending.get(m.cmid)
            if fut is not None:
                try:
                    async with asyncio.timeout(_OWN_WAIT):
                        sent = await asyncio.shield(fut)
                except TimeoutError:
                    sent = None
                if sent is not None:
                    self._pending.pop(m.cmid, None)
                    return ev.cur, sent, True
        return ev.cur, encode_event(ev), False


def writer_close(exc: BaseException, conn_id: int) -> tuple[int, str]:
    """The close (code, reason) for a writer task that raised `exc` (logged here)."""
    if isinstance(exc, StreamGap):
        log.error("conn %d: %s", conn_id, exc)
        return CloseCode.INTERNAL_ERROR, "stream gap"
    if isinstance(exc, StorageError):
        log.warning("conn %d: storage unavailable while writing events", conn_id)
        return CloseCode.TRY_AGAIN_LATER, "storage unavailable"
    log.error("conn %d: writer failed", conn_id, exc_info=exc)
    return CloseCode.INTERNAL_ERROR, "internal error"
