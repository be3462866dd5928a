"""One session per WebSocket connection.

Two tasks own a connection: the *reader* (this module's `run`) decodes client
frames and acts on them; the *writer* (`_write_loop`) writes to the socket from
an ordered outbox. While the writer is idle (the outbox is empty), a frame that
can go out without waiting is serialised at once by `_write_soon`, with the same
bookkeeping (`_frames_for`), so order is the same either way; the frames of one
loop iteration leave in one socket write at its end. Every event of the user's
stream goes out in `cur` order with no gap and no repeat:

- `_last` is the highest `cur` written on this connection;
- a live event at `_last + 1` is written; one at or below `_last` is dropped
  (catch-up or a gap fill already wrote it); one above `_last + 1` means events
  are missing (a publish not yet arrived, or lost): they are read back from
  storage first (`_fill`), which is safe because per user `cur` order is
  commit order;
- the result of this connection's own write (`sent`, or a receipt and `ok`)
  takes its `cur` place the same way, so `sent` replaces the `msg` event of
  this connection's own message. When a gap fill meets an own message still
  waiting for its `sent`, it waits for that reply and writes it in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.protocol import State

from protocol import (
    ConvsRequest,
    ErrorCode,
    FrameError,
    Hello,
    HistoryRequest,
    Mark,
    Ping,
    Send,
    Typing,
    body_size,
    decode_client,
    decode_map,
    encode_map,
    request_id,
)
from storage.base import (
    Event,
    MarkOutcome,
    NotAMember,
    SendOutcome,
    StorageError,
    StorageUnavailable,
    UptoTooHigh,
)

from .broker import LiveEvent
from .connection import ChatConnection
from .errors import AuthError
from .hub import TooManyConnections, UserState
from .wire import encode_event, msg_map, receipt_map

if TYPE_CHECKING:
    from .server import Context

log = logging.getLogger("chatd.session")

__all__ = ["Session"]

_PLAIN, _LIVE, _OWN_SENT, _OWN_MARK, _CLOSE = range(5)
_PAGE = 500
_BACKLOG_PAUSE = 64
"""Held messages at which the socket stops being read (resumed at half)."""
_MAX_IN_FLIGHT = 256
"""Writes (sends, marks) of one connection in flight before its messages are held."""
_READ_WAIT = 1.0
"""Seconds a history / convs read waits at most for the connection's queued frames."""
_MARKS_KEPT = 1024
"""(conv, kind) watermarks a connection remembers at most (then it starts over)."""
_OWN_WAIT = 30.0
"""Seconds a gap fill waits for this connection's own `sent` reply."""

Item = tuple[int, int, bytes, bytes | None, str]
"""(kind, cur, data, after, cmid): `after` is written after `data` (a mark's `ok`);
`cmid` names this connection's own send for an `_OWN_SENT` item."""


def _remember(
    table: dict[tuple[int | str, str], int] | None, conv: int | str, kind: str, value: int
) -> dict[tuple[int | str, str], int]:
    """`table` (made when None) with (conv, kind) raised to `value`; a `read` value holds
    for `delivered` too (delivered >= read, always). Starts over past _MARKS_KEPT keys."""
    if table is None:
        table = {}
    elif len(table) >= _MARKS_KEPT:
        table.clear()
    key = (conv, kind)
    if value > table.get(key, -1):
        table[key] = value
    if kind == "read":
        key = (conv, "delivered")
        if value > table.get(key, -1):
            table[key] = value
    return table


def now_ms() -> int:
    return int(time.time() * 1000)


class _Closing(Exception):
    """Raised inside the reader to close the connection with (code, reason)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Session:
    __slots__ = (
        "_backlog",
        "_bad_in_row",
        "_busy",
        "_capped",
        "_close_started",
        "_closing",
        "_count",
        "_count_since",
        "_drained",
        "_flush_soon",
        "_last",
        "_marked",
        "_outbox",
        "_outbox_bytes",
        "_paused",
        "_pending",
        "_reading",
        "_state",
        "_tasks",
        "_throttled",
        "_waiter",
        "_wake",
        "_writer",
        "_writes",
        "_written_own",
        "conn_id",
        "ctx",
        "device",
        "user",
        "ws",
    )

    def __init__(self, ctx: Context, ws: ChatConnection, conn_id: int) -> None:
        self.ctx = ctx
        self.ws = ws
        self.conn_id = conn_id
        self.user = ""
        self.device = ""
        self._state: UserState | None = None
        self._outbox: list[Item] = []
        """Frames queued for the writer; it takes the whole list at a time (FIFO)."""
        self._outbox_bytes = 0
        """The size of the frames in `_outbox`."""
        self._waiter: asyncio.Future[None] | None = None
        """Set while the writer is idle; resolved by the next push."""
        self._drained: asyncio.Future[None] | None = None
        """Set while someone waits for the outbox to be written (before a close)."""
        self._flush_soon = False
        """`_flush` is scheduled: frames wait in websockets' buffer until it runs."""
        self._last = 0
        self._marked: dict[tuple[int | str, str], int] | None = None
        """(conv, kind) -> this user's watermark as a mark of this connection last
        committed it: a mark at or below it is answered without a write."""
        self._capped: dict[tuple[int | str, str], int] | None = None
        """(conv, kind) -> the highest `upto` of a mark that changed nothing because no
        message to this user lies above the watermark (it was capped): the same holds
        for marks up to it until a stream event reaches this connection (dropped then)."""
        self._pending: dict[str, asyncio.Future[bytes | None]] = {}
        self._written_own: set[int] | None = None
        """`cur`s of own `sent` replies a gap fill wrote early (rare: made on demand)."""
        self._tasks: set[asyncio.Future[Any]] | None = None
        """Tasks and store writes in flight (a write's done-callback removes it)."""
        self._writer: asyncio.Task[None] | None = None
        self._bad_in_row = 0
        self._count = 0
        """Messages received since `_count_since` (a run of max_frame_rate at most)."""
        self._count_since = time.monotonic()
        self._writes = 0
        """Store writes (sends, marks) of this connection in flight."""
        self._backlog: deque[bytes | str] | None = None
        """Messages received while held (before `welcome`, during a history / convs
        request, with too many writes in flight): handled in order when released."""
        self._reading = False
        """`welcome` is sent: messages are handled as they arrive (unless held)."""
        self._busy = False
        """A history / convs request is running: later messages wait for its answer."""
        self._throttled = False
        """Too many writes of this connection in flight: later messages wait."""
        self._paused = False
        """The transport is not reading (the backlog is long)."""
        self._wake: asyncio.Future[None] | None = None
        """Set while `_recv` waits for a message (before `welcome`)."""
        self._closing = False
        """No more frames are queued: the connection is being closed."""
        self._close_started = False

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        metrics = self.ctx.metrics
        metrics.connections.inc()
        ws = self.ws
        try:
            _forget_handshake(ws)
            ws.set_sink(self._on_message)
            hello = await self._await_hello()
            if hello is not None:
                await self._serve(hello)
                self._reading = True
                self._release()
                await ws.wait_closed()
        except _Closing as exc:
            await self._close(exc.code, exc.reason)
        except ConnectionClosed:
            pass
        finally:
            ws.set_sink(None)
            metrics.connections.dec()
            await self._teardown()

    async def _teardown(self) -> None:
        self._closing_input()
        if self._tasks:
            # In-flight writes finish (they are durable either way); replies may be lost.
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._writer = None  # its traceback refers to this session: no cycle to collect
        if self._state is not None:
            self.ctx.metrics.sessions.dec()
            await self.ctx.hub.detach(self)
            log.info("conn %d: closed (user %s, device %s)", self.conn_id, self.user, self.device)

    async def _close(self, code: int, reason: str) -> None:
        self._closing = True
        if self._close_started:
            return
        self._close_started = True
        self.ctx.metrics.closes.labels(str(code)).inc()
        log.info("conn %d: closing %d (%s)", self.conn_id, code, reason)
        await self.ws.close(code, reason)

    # ------------------------------------------------------------------ handshake

    async def _await_hello(self) -> Hello | None:
        policy = self.ctx.config.policy
        try:
            async with asyncio.timeout(policy.hello_timeout):
                while True:
                    data = await self._recv()
                    try:
                        m = decode_map(data)
                    except FrameError:
                        m = None
                    if m is not None and m.get("t") != "hello":
                        self._bad_in_row = 0
                        await self._send_now(
                            _error(ErrorCode.UNAUTHORIZED, "say hello first", request_id(m))
                        )
                        continue
                    frame, answer, close = self._parse(data)
                    if answer is not None:
                        await self._send_now(answer)
                    if close:
                        raise _Closing(CloseCode.POLICY_VIOLATION, "too many bad frames")
                    if frame is None:
                        continue
                    assert isinstance(frame, Hello)
                    try:
                        self.user = self.ctx.auth.verify(frame.token)
                    except AuthError as exc:
                        log.info("conn %d: refused token (%s)", self.conn_id, exc)
                        await self._send_now(
                            _error(ErrorCode.UNAUTHORIZED, "bad or expired token", frame.id)
                        )
                        raise _Closing(CloseCode.POLICY_VIOLATION, "unauthorized") from None
                    self.device = frame.device
                    return frame
        except TimeoutError:
            raise _Closing(CloseCode.POLICY_VIOLATION, "no hello in time") from None

    async def _serve(self, hello: Hello) -> None:
        ctx = self.ctx
        try:
            self._state = await ctx.hub.attach(self)
        except TooManyConnections:
            await self._send_now(
                _error(
                    ErrorCode.RATE_LIMITED,
                    "too many connections for this user",
                    hello.id,
                    retry_ms=1000,
                )
            )
            raise _Closing(CloseCode.TRY_AGAIN_LATER, "too many connections") from None
        ctx.metrics.sessions.inc()
        try:
            welcome_cur = await ctx.store.last_cur(self.user)
        except StorageError as exc:
            log.warning("conn %d: storage unavailable at hello: %s", self.conn_id, exc)
            await self._send_now(_error(ErrorCode.UNAVAILABLE, "storage unavailable", hello.id))
            raise _Closing(CloseCode.TRY_AGAIN_LATER, "storage unavailable") from None
        welcome: dict[str, Any] = {
            "t": "welcome",
            "user": self.user,
            "device": self.device,
            "cur": welcome_cur,
            "ts": now_ms(),
        }
        if hello.id is not None:
            welcome["id"] = hello.id
        await self._send_now(encode_map(welcome))
        log.info(
            "conn %d: hello user %s device %s since %s cur %d",
            self.conn_id,
            self.user,
            self.device,
            hello.since,
            welcome_cur,
        )
        self._writer = asyncio.create_task(self._write_loop(hello.since, welcome_cur))
        self._writer.add_done_callback(self._writer_done)

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None or isinstance(exc, ConnectionClosed):
            return
        if isinstance(exc, _Closing):
            self._spawn(self._close(exc.code, exc.reason))
        elif isinstance(exc, StorageError):
            log.warning("conn %d: storage unavailable while writing events", self.conn_id)
            self._spawn(self._close(CloseCode.TRY_AGAIN_LATER, "storage unavailable"))
        else:
            log.error("conn %d: writer failed", self.conn_id, exc_info=exc)
            self._spawn(self._close(CloseCode.INTERNAL_ERROR, "internal error"))

    # ------------------------------------------------------------------ reading

    def _on_message(self, data: bytes | str) -> None:
        """The connection's sink: one whole client message, from the protocol callback."""
        if self._closing:
            return
        count = self._count + 1
        if count > self.ctx.config.policy.max_frame_rate:  # more than N in a second?
            now = time.monotonic()
            if now - self._count_since < 1.0:
                self._close_drained(CloseCode.POLICY_VIOLATION, "too many frames")
                return
            count = 1  # this message starts the next run
            self._count_since = now
        self._count = count
        if self._reading and not (self._busy or self._throttled) and not self._backlog:
            self._handle(data)
            return
        if self._backlog is None:
            self._backlog = deque()
        self._backlog.append(data)
        if len(self._backlog) >= _BACKLOG_PAUSE and not self._paused:
            self._paused = True
            self.ws.transport.pause_reading()
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _recv(self) -> bytes | str:
        """The next message before `welcome` (afterwards `_on_message` handles them)."""
        backlog = self._backlog
        while not backlog:
            wake = self._wake = asyncio.get_running_loop().create_future()
            closed = asyncio.ensure_future(self.ws.wait_closed())
            try:
                await asyncio.wait((wake, closed), return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._wake = None
                closed.cancel()
            if not wake.done():
                raise self.ws.protocol.close_exc
            backlog = self._backlog
        data = backlog.popleft()
        if not backlog:
            self._backlog = None  # an idle connection keeps no deque (about 600 bytes)
        self._resume_if_short()
        return data

    def _release(self) -> None:
        """Handle the held messages, in order, until something holds them again."""
        backlog = self._backlog
        while backlog and self._reading and not (self._busy or self._throttled or self._closing):
            self._handle(backlog.popleft())
        if not backlog:
            self._backlog = None
        self._resume_if_short()

    def _resume_if_short(self) -> None:
        if self._paused and (not self._backlog or len(self._backlog) < _BACKLOG_PAUSE // 2):
            self._paused = False
            transport = self.ws.transport
            if not transport.is_closing():
                transport.resume_reading()

    def _handle(self, data: bytes | str) -> None:
        frame, answer, close = self._parse(data)
        if answer is not None:
            self._reply(answer)
        if close:  # nothing after the last bad frame allowed is acted on
            self._close_drained(CloseCode.POLICY_VIOLATION, "too many bad frames")
            return
        if frame is None:
            return
        try:
            self._dispatch(frame)
        except FrameError as exc:
            self._reply(_error(exc.code, exc.msg, exc.id, exc.retry_ms))
        except Exception:  # a bug: never let it into websockets' protocol callback
            log.exception("conn %d: failed to handle a %s frame", self.conn_id, frame.t)
            self._close_drained(CloseCode.INTERNAL_ERROR, "internal error")

    def _parse(self, data: bytes | str) -> tuple[Any, bytes | None, bool]:
        """Decode a message: (frame, None, False), or (None, the error frame answering it,
        whether it was the last bad frame in a row allowed)."""
        ctx = self.ctx
        try:
            frame = decode_client(data, ctx.config.limits)
        except FrameError as exc:
            ctx.metrics.errors.labels(exc.code).inc()
            ctx.metrics.frames_in.labels("invalid").inc()
            answer = _error(exc.code, exc.msg, exc.id)
            if exc.code is not ErrorCode.BAD_FRAME:
                self._bad_in_row = 0
                return None, answer, False
            self._bad_in_row += 1
            return None, answer, self._bad_in_row >= ctx.config.policy.max_bad_frames
        self._bad_in_row = 0
        ctx.metrics.frame_in(frame.t)
        return frame, None, False

    def _close_drained(self, code: int, reason: str) -> None:
        """Stop acting on input now; close once the frames already queued (the last
        error frame) are written."""
        self._closing_input()
        self._spawn(self._drain_then_close(code, reason))

    async def _drain_then_close(self, code: int, reason: str) -> None:
        await self._drain()
        await self._close(code, reason)

    def _closing_input(self) -> None:
        """Act on and queue nothing more: the connection is being closed. A paused
        socket is read again, so that the closing handshake can complete (whatever
        else arrives is dropped)."""
        self._reading = False
        self._closing = True
        self._backlog = None
        self._resume_if_short()

    def _dispatch(self, frame: Any) -> None:
        if isinstance(frame, Send):
            try:
                self._start_send(frame)
            except Exception as exc:
                self._fail(frame.id, exc)
        elif isinstance(frame, Mark):
            try:
                self._start_mark(frame)
            except Exception as exc:
                self._fail(frame.id, exc)
        elif isinstance(frame, Typing):
            self._on_typing(frame)
        elif isinstance(frame, HistoryRequest):
            self._hold_for(frame.id, self._on_history(frame))
        elif isinstance(frame, ConvsRequest):
            self._hold_for(frame.id, self._on_convs(frame))
        elif isinstance(frame, Ping):
            pong: dict[str, Any] = {"t": "pong", "ts": now_ms()}
            if frame.id is not None:
                pong["id"] = frame.id
            self._reply(encode_map(pong))
        elif isinstance(frame, Hello):
            raise FrameError(ErrorCode.BAD_REQUEST, "already said hello", frame.id)

    def _hold_for(self, rid: Any, coro: Awaitable[None]) -> None:
        """Run a read request; the messages after it wait for its answer (as they would
        behind a blocking read), so answers keep the order of the requests."""
        self._busy = True
        self._spawn(self._held(rid, coro))

    async def _held(self, rid: Any, coro: Awaitable[None]) -> None:
        try:
            # A read's answer may be large (a history page): start it once what is
            # queued for this connection has gone to the socket, or after _READ_WAIT
            # (a reader with a standing backlog must still be answered), so that a
            # client that asks and never reads holds few answers here (the outbox's
            # byte limit closes it before they add up).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_READ_WAIT):
                    await self._written()
            await self._guard(rid, coro)
        finally:
            self._busy = False
            self._release()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _track(self, fut: asyncio.Future[Any]) -> None:
        """Count a store write in flight until its done-callback calls `_untrack`; with
        too many in flight, later messages wait (and the socket stops being read)."""
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(fut)
        self._writes += 1
        if self._writes >= _MAX_IN_FLIGHT:
            self._throttled = True

    def _untrack(self, fut: asyncio.Future[Any]) -> None:
        if self._tasks is not None:
            self._tasks.discard(fut)
        self._writes -= 1
        if self._throttled and self._writes <= _MAX_IN_FLIGHT // 2:
            self._throttled = False
            self._release()

    async def _guard(self, rid: Any, coro: Awaitable[None]) -> None:
        """Run a request; map what it raises to exactly one error frame."""
        try:
            await coro
        except Exception as exc:
            self._fail(rid, exc)

    def _fail(self, rid: Any, exc: BaseException) -> None:
        """Answer the request `rid` that raised `exc` with exactly one error frame."""
        if isinstance(exc, FrameError):
            self._reply(_error(exc.code, exc.msg, rid, exc.retry_ms))
        elif isinstance(exc, StorageUnavailable):
            log.warning("conn %d: storage unavailable", self.conn_id)
            self._reply(_error(ErrorCode.UNAVAILABLE, "storage unavailable; retry later", rid))
        elif isinstance(exc, ConnectionClosed):
            pass
        else:
            log.error("conn %d: request failed", self.conn_id, exc_info=exc)
            self._reply(_error(ErrorCode.INTERNAL, "internal error", rid))

    # ------------------------------------------------------------------ requests

    def _start_send(self, f: Send) -> None:
        """Queue a send in the store; `_send_done` answers it (no task per message)."""
        ctx = self.ctx
        assert self._state is not None
        wait = self._state.sends.take(time.monotonic())
        refused: FrameError | None = None
        if wait > 0.0:
            refused = FrameError(
                ErrorCode.RATE_LIMITED,
                "too many messages; retry later",
                retry_ms=max(1, math.ceil(wait * 1000)),
            )
        elif f.to == self.user:
            refused = FrameError(ErrorCode.BAD_REQUEST, "cannot send to yourself")
        if refused is not None:
            # A self-send took a token (a flood of them is limited like sends); a retry
            # of a stored message gives it back, as any duplicate does.
            took = wait <= 0.0
            # Held like a read: one lookup at a time per connection, and the frames
            # after it wait (a flood of refused sends cannot queue unbounded reads).
            self._hold_for(f.id, self._dup_or_refuse(f, refused, took))
            return
        pend: asyncio.Future[bytes | None] | None = None
        if f.cmid not in self._pending:
            pend = asyncio.get_running_loop().create_future()
            self._pending[f.cmid] = pend
        try:
            fut = ctx.store.send(self.user, f.to, f.cmid, f.body, f.type, now_ms())
        except BaseException:
            if pend is not None:
                self._unpend(f.cmid, pend, None)
            raise
        self._track(fut)
        started = time.perf_counter()
        fut.add_done_callback(lambda done: self._send_done(f, pend, started, done))

    async def _dup_or_refuse(self, f: Send, refused: FrameError, took: bool) -> None:
        """A send refused here (over the send rate, or to oneself): a retry of a stored
        (sender, cmid) still gets the original `sent` with `dup`, whatever its `to` and
        body now; any other send gets `refused`. `took`: it used up a rate token."""
        prior = await self.ctx.store.find_sent(self.user, f.cmid)
        if prior is None:
            raise refused
        if took:
            assert self._state is not None
            self._state.sends.refund()
        self.ctx.metrics.duplicates.inc()
        self._reply(_sent(f.id, prior.message, prior.sender_cur, dup=True))

    def _send_done(
        self,
        f: Send,
        pend: asyncio.Future[bytes | None] | None,
        started: float,
        fut: asyncio.Future[SendOutcome],
    ) -> None:
        self._untrack(fut)
        ctx = self.ctx
        try:
            exc = _failure(fut)
            if exc is not None:
                if pend is not None:
                    self._unpend(f.cmid, pend, None)
                self._fail(f.id, exc)
                return
            out = fut.result()
            ctx.metrics.commit_seconds.observe(time.perf_counter() - started)
            m = out.message
            if out.dup:
                assert self._state is not None
                self._state.sends.refund()  # a duplicate stores nothing: it costs no rate
                ctx.metrics.duplicates.inc()
                if pend is not None:
                    self._unpend(f.cmid, pend, None)
                self._reply(_sent(f.id, m, out.sender_cur, dup=True))
                return
            ctx.metrics.messages.inc()
            sent = _sent(f.id, m, out.sender_cur, dup=False)
            if pend is not None and not pend.done():
                pend.set_result(sent)
            self._push((_OWN_SENT, out.sender_cur, sent, None, f.cmid if pend is not None else ""))
            mine = msg_map(m, out.sender_cur)
            theirs = dict(mine)
            theirs["cur"] = out.recipient_cur
            self._publish(
                [
                    (self.user, LiveEvent(out.sender_cur, encode_map(mine))),
                    (m.recipient, LiveEvent(out.recipient_cur, encode_map(theirs))),
                ]
            )
        except Exception as exc:
            self._fail(f.id, exc)

    def _unpend(self, cmid: str, fut: asyncio.Future[bytes | None], value: bytes | None) -> None:
        if not fut.done():
            fut.set_result(value)
        if self._pending.get(cmid) is fut:
            del self._pending[cmid]

    def _start_mark(self, f: Mark) -> None:
        """Queue a mark in the store; `_mark_done` answers it."""
        if type(f.conv) is not str:
            raise FrameError(ErrorCode.BAD_REQUEST, "not a conversation of yours")
        key = (f.conv, f.kind)
        marked = self._marked
        capped = self._capped
        if (marked is not None and f.upto <= marked.get(key, -1)) or (
            capped is not None and f.upto <= capped.get(key, -1)
        ):
            # Watermarks only move forward and this one is committed at or above
            # `upto`, or no message to this user arrived since the same mark changed
            # nothing: nothing to store (a flood of these costs the writer nothing).
            if f.id is not None:
                self._reply(encode_map({"t": "ok", "id": f.id}))
            return
        fut = self.ctx.store.mark(self.user, f.conv, f.kind, f.upto, now_ms())
        self._track(fut)
        fut.add_done_callback(lambda done: self._mark_done(f, done))

    def _mark_done(self, f: Mark, fut: asyncio.Future[MarkOutcome]) -> None:
        self._untrack(fut)
        try:
            exc = _failure(fut)
            if isinstance(exc, NotAMember):
                exc = FrameError(ErrorCode.BAD_REQUEST, "not a conversation of yours")
            elif isinstance(exc, UptoTooHigh):
                exc = FrameError(
                    ErrorCode.BAD_REQUEST, "'upto' is above the conversation's last seq"
                )
            if exc is not None:
                self._fail(f.id, exc)
                return
            out = fut.result()
            r = out.receipt
            self._marked = _remember(self._marked, f.conv, f.kind, out.watermark)
            if r is None and out.watermark < f.upto:  # capped: no message to us up there
                self._capped = _remember(self._capped, f.conv, f.kind, f.upto)
            ok = encode_map({"t": "ok", "id": f.id}) if f.id is not None else None
            if r is None:
                if ok is not None:
                    self._reply(ok)
                return
            self.ctx.metrics.receipts.labels(r.kind).inc()
            mine = encode_map(receipt_map(r, out.marker_cur))
            self._push((_OWN_MARK, out.marker_cur, mine, ok, ""))
            self._publish(
                [
                    (self.user, LiveEvent(out.marker_cur, mine)),
                    (out.peer, LiveEvent(out.peer_cur, encode_map(receipt_map(r, out.peer_cur)))),
                ]
            )
        except Exception as exc:
            self._fail(f.id, exc)

    def _on_typing(self, f: Typing) -> None:
        if f.to == self.user:
            raise FrameError(ErrorCode.BAD_REQUEST, "cannot type to yourself", f.id)
        assert self._state is not None
        wait = self._state.typing.take(time.monotonic())
        if wait > 0.0:
            if f.id is not None:
                raise FrameError(
                    ErrorCode.RATE_LIMITED,
                    "typing too often",
                    f.id,
                    retry_ms=max(1, math.ceil(wait * 1000)),
                )
            return
        data = encode_map({"t": "typing", "from": self.user, "on": f.on})
        self._publish([(f.to, LiveEvent(0, data))])
        if f.id is not None:
            self._reply(encode_map({"t": "ok", "id": f.id}))

    async def _on_history(self, f: HistoryRequest) -> None:
        if f.with_ == self.user:
            raise FrameError(ErrorCode.BAD_REQUEST, "'with' must be another user")
        limits = self.ctx.config.limits
        limit = f.limit if f.limit is not None else limits.history_default
        if limit > limits.history_max:
            raise FrameError(ErrorCode.BAD_REQUEST, f"'limit' is at most {limits.history_max}")
        page = await self.ctx.store.history(self.user, f.with_, f.before, limit)
        msgs: list[dict[str, Any]] = []
        more = page.more
        size = 0
        for m in page.messages:  # newest first: a page cut short ends at an older `seq`
            size += body_size(m.body)
            if msgs and size > limits.history_bytes:
                more = True
                break
            msgs.append(msg_map(m, None))
        self._reply(
            encode_map(
                {
                    "t": "history",
                    "id": f.id,
                    "conv": page.conv,
                    "msgs": msgs,
                    "more": more,
                    "delivered": page.delivered,
                    "read": page.read,
                }
            )
        )

    async def _on_convs(self, f: ConvsRequest) -> None:
        limits = self.ctx.config.limits
        limit = f.limit if f.limit is not None else limits.convs_default
        if limit > limits.convs_max:
            raise FrameError(ErrorCode.BAD_REQUEST, f"'limit' is at most {limits.convs_max}")
        rows = await self.ctx.store.convs(self.user, limit)
        convs = [
            {
                "conv": c.conv,
                "with": c.peer,
                "seq": c.seq,
                "ts": c.ts,
                "unread": c.unread,
                "delivered": c.delivered,
                "read": c.read,
            }
            for c in rows
        ]
        self._reply(encode_map({"t": "convs", "id": f.id, "convs": convs}))

    def _publish(self, events: list[tuple[str, LiveEvent]]) -> None:
        try:
            self.ctx.broker.publish(events)
        except Exception:
            # Stored already: receivers find it by gap fill or on their next connect.
            log.warning("conn %d: publish failed; receivers will catch up", self.conn_id)

    # ------------------------------------------------------------------ writing

    def push_live(self, event: LiveEvent) -> None:
        """Hub callback: a live event for this user."""
        if event.cur and self._capped is not None:
            self._capped = None  # perhaps a message to us: capping may differ now
        self._push((_LIVE, event.cur, event.data, None, ""))

    def _reply(self, data: bytes) -> None:
        self._push((_PLAIN, 0, data, None, ""))

    def _push(self, item: Item) -> None:
        if self._closing:
            return
        waiter = self._waiter
        idle = waiter is not None and not waiter.done()
        # The writer is idle, so the outbox is empty: write without waking it when
        # nothing can make the write wait (no task switch per frame on the hot path).
        if idle and self._write_soon(item):
            return
        self._outbox.append(item)
        self._outbox_bytes += len(item[2]) + (len(item[3]) if item[3] else 0)
        if idle:
            assert waiter is not None
            waiter.set_result(None)
            return
        config = self.ctx.config
        if len(self._outbox) > config.outbox_limit or self._outbox_bytes > config.outbox_bytes:
            # It loses nothing: it resumes with `since` and reads the rest from storage.
            self._outbox.clear()
            self._outbox_bytes = 0
            self._closing_input()
            self._spawn(self._close(CloseCode.TRY_AGAIN_LATER, "slow reader"))

    def _write_soon(self, item: Item) -> bool:
        """Serialise `item`'s frames now when that is exactly what the writer would do
        without waiting: the connection is open, the socket's buffer is below its high
        mark, and no stored event is missing before it. They join websockets' outgoing
        buffer, which `_flush` writes (one socket write for every frame of this loop
        iteration) unless websockets writes it first; both keep its order. False leaves
        `item` to the writer."""
        ws = self.ws
        if ws.protocol.state is not State.OPEN or ws.paused or ws.transport.is_closing():
            return False
        frames = self._frames_for(item)
        if frames is None:
            return False
        if frames:
            proto = ws.protocol
            for frame in frames:
                proto.send_binary(frame)
            if not self._flush_soon:
                self._flush_soon = True
                asyncio.get_running_loop().call_soon(self._flush)
        return True

    def _flush(self) -> None:
        self._flush_soon = False
        ws = self.ws
        if ws.transport.is_closing():
            return  # the socket is gone: the client resumes with `since`
        try:
            if ws.protocol.state is State.OPEN:
                data = ws.protocol.data_to_send()
                if data:  # else websockets wrote them already
                    ws.transport.write(b"".join(data))
            else:
                ws.send_data()  # closing: websockets' own write (it may half-close)
        except Exception as exc:  # as websockets' send_context does
            log.info("conn %d: write failed: %s", self.conn_id, type(exc).__name__)
            ws.transport.abort()

    async def _send_now(self, data: bytes) -> None:
        await self.ws.send(data)

    async def _drain(self) -> None:
        """Wait (5 s at most) until the outbox is written, before a deliberate close."""
        try:
            async with asyncio.timeout(5.0):
                await self._written()
        except TimeoutError:
            pass

    async def _written(self) -> None:
        """Until the outbox is empty and the writer idle (its last frames handed to the
        socket below its buffer's high mark), or the writer has ended."""
        writer = self._writer
        if writer is None or writer.done() or (not self._outbox and self._waiter is not None):
            return
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()
        await asyncio.wait((self._drained, writer), return_when=asyncio.FIRST_COMPLETED)

    async def _write_loop(self, since: int | None, welcome_cur: int) -> None:
        store = self.ctx.store
        # Catch-up: exactly the events with since < cur <= welcome_cur.
        after = 0 if since is None else since
        while after < welcome_cur:
            if since is None:
                page = await store.undelivered(self.user, after, welcome_cur, _PAGE)
            else:
                page = await store.events(self.user, after, welcome_cur, _PAGE)
            if page:
                await self._write([encode_event(ev) for ev in page])
            if len(page) < _PAGE:
                break
            after = page[-1].cur
        await self._write([encode_map({"t": "synced", "cur": welcome_cur})])
        self._last = welcome_cur
        loop = asyncio.get_running_loop()
        while True:
            if not self._outbox:
                drained, self._drained = self._drained, None
                if drained is not None and not drained.done():
                    drained.set_result(None)
                self._waiter = loop.create_future()
                await self._waiter
                self._waiter = None
                continue
            items, self._outbox = self._outbox, []
            self._outbox_bytes = 0
            out: list[bytes] = []
            for item in items:
                frames = self._frames_for(item)
                if frames is None:
                    if out:
                        await self._write(out)
                        out = []
                    await self._fill(item[1] - 1)
                    frames = self._frames_for(item)
                    assert frames is not None
                out.extend(frames)
            if out:
                await self._write(out)

    def _frames_for(self, item: Item) -> list[bytes] | None:
        """The frames `item` puts on the wire now, in order, moving `_last` on;
        None when events below it are missing (the writer fills the gap first)."""
        kind, cur, data, after_data, cmid = item
        if kind == _PLAIN or (kind == _LIVE and cur == 0):
            return [data]
        if cur > self._last + 1:
            return None
        if kind == _OWN_SENT and cmid:
            self._pending.pop(cmid, None)
        if cur <= self._last:
            # Already written (catch-up or gap fill). An own result still owes its reply.
            if kind == _OWN_SENT:
                if self._written_own and cur in self._written_own:
                    self._written_own.discard(cur)
                    return []
                return [data]
            if kind == _OWN_MARK and after_data is not None:
                return [after_data]
            return []
        self._last = cur
        return [data] if after_data is None else [data, after_data]

    async def _write(self, frames: list[bytes]) -> None:
        """Write binary frames in order with one socket write (websockets' sans-I/O layer).

        `send_context()` checks the connection is open before and waits for the socket's
        buffer to drain after; nothing awaits in between, so no close can slip in."""
        ws = self.ws
        async with ws.send_context():
            proto = ws.protocol
            for frame in frames:
                proto.send_binary(frame)
            ws.transport.write(b"".join(proto.data_to_send()))

    async def _fill(self, upto: int) -> None:
        """Write the stored events with _last < cur <= upto (a gap in the live feed)."""
        store = self.ctx.store
        while self._last < upto:
            page = await store.events(self.user, self._last, upto, _PAGE)
            if not page:
                log.error(
                    "conn %d: events %d..%d missing from storage", self.conn_id, self._last, upto
                )
                raise _Closing(CloseCode.INTERNAL_ERROR, "stream gap")
            self.ctx.metrics.gap_fills.inc(len(page))
            frames = [await self._own_or_event(ev) for ev in page]
            await self._write(frames)
            self._last = page[-1].cur

    async def _own_or_event(self, ev: Event) -> bytes:
        """The frame for a stored event: this connection's own `sent` if it is waiting."""
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
                    if self._written_own is None:
                        self._written_own = set()
                    self._written_own.add(ev.cur)
                    self._pending.pop(m.cmid, None)
                    return sent
        return encode_event(ev)


def _forget_handshake(ws: ChatConnection) -> None:
    """Drop the upgrade's headers, which websockets keeps for the connection's lifetime.

    chatd reads nothing from them after the upgrade, and they are the largest part
    of an idle connection's memory (about 4 KiB). The request object itself stays:
    websockets takes a non-None `request` to mean "handshake done", and its parser
    still refers to it, so its headers are emptied in place.
    """
    if ws.request is not None:
        ws.request.headers.clear()
    ws.response = None


def _failure(fut: asyncio.Future[Any]) -> BaseException | None:
    """What a finished store write raised (a cancelled one: storage unavailable), or None."""
    return fut.exception() if not fut.cancelled() else StorageUnavailable("cancelled")


def _error(code: ErrorCode, msg: str, rid: Any = None, retry_ms: int | None = None) -> bytes:
    out: dict[str, Any] = {"t": "error", "code": str(code), "msg": msg}
    if rid is not None:
        out["id"] = rid
    if retry_ms is not None:
        out["retry_ms"] = retry_ms
    return encode_map(out)


def _sent(rid: Any, m: Any, cur: int, dup: bool) -> bytes:
    out: dict[str, Any] = {
        "t": "sent",
        "id": rid,
        "cmid": m.cmid,
        "mid": m.mid,
        "conv": m.conv,
        "seq": m.seq,
        "ts": m.ts,
        "cur": cur,
    }
    if dup:
        out["dup"] = True
    return encode_map(out)
