"""One session per WebSocket connection: hello, lifecycle, dispatch, and the state of the
connection.

The path of a frame: `ChatConnection` hands each whole message to `_on_message` (no
reader task); after `welcome` it is decoded and dispatched at once to the request
handlers (`handlers.Requests`), unless something holds the messages back, in which
case it waits in the backlog and the socket stops being read past `_BACKLOG_PAUSE`.
Everything the connection writes goes through its `Outbox`, whose `Sequencer` keeps
the user's stream in `cur` order.

The connection's phase, one value (h11-style; phases only move forward):

| phase   | a message that arrives                    | a frame to write         |
|---------|-------------------------------------------|--------------------------|
| HELLO   | waits for the hello loop (`_recv`)        | written at once (`send`) |
| OPEN    | handled, or held in order (see `_holds`)  | through the outbox       |
| CLOSING | dropped                                   | dropped                  |
| CLOSED  | dropped (the closing handshake is on)     | dropped                  |

While OPEN, messages are held (kept in order, handled when released) for two reasons
(`_holds`, a set of bits): a read request (`history`, `convs`, a duplicate lookup) is
being answered, or too many of this connection's writes are in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable
from enum import IntEnum
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

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
    decode_client,
    decode_map,
    encode_map,
    pong_map,
    request_id,
    welcome_map,
)
from storage.base import StorageError

from .broker import LiveEvent
from .connection import ChatConnection
from .context import Context
from .errors import AuthError, ChatdError
from .handlers import Requests, error_frame, now_ms
from .hub import TooManyConnections
from .outbox import Outbox
from .sequencer import LIVE, StreamGap

log = logging.getLogger("chatd.session")

__all__ = ["Phase", "Session"]


class Phase(IntEnum):
    HELLO = 0
    OPEN = 1
    CLOSING = 2
    CLOSED = 3


_NEXT: dict[Phase, frozenset[Phase]] = {
    Phase.HELLO: frozenset({Phase.OPEN, Phase.CLOSING, Phase.CLOSED}),
    Phase.OPEN: frozenset({Phase.CLOSING, Phase.CLOSED}),
    Phase.CLOSING: frozenset({Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}
"""The phases each phase may move to."""

_HOLD_READ = 1
"""A read request is being answered: later messages wait for its answer."""
_HOLD_WRITES = 2
"""Too many writes of this connection in flight: later messages wait."""

_BACKLOG_PAUSE = 64
"""Held messages at which the socket stops being read (resumed at half)."""
_MAX_IN_FLIGHT = 256
"""Writes (sends, marks) of one connection in flight before its messages are held."""
_READ_WAIT = 1.0
"""Seconds a history / convs read waits at most for the connection's queued frames."""


class _Closing(ChatdError):
    """Raised inside the session to close the connection with (code, reason)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Session:
    __slots__ = (
        "_backlog",
        "_bad_in_row",
        "_count",
        "_count_since",
        "_holds",
        "_paused",
        "_phase",
        "_tasks",
        "_wake",
        "_writes",
        "conn_id",
        "ctx",
        "device",
        "out",
        "req",
        "user",
        "ws",
    )

    def __init__(self, ctx: Context, ws: ChatConnection, conn_id: int) -> None:
        self.ctx = ctx
        self.ws = ws
        self.conn_id = conn_id
        self.user = ""
        self.device = ""
        self._phase = Phase.HELLO
        self._holds = 0
        self.out = Outbox(
            ws,
            ctx.store,
            ctx.metrics,
            conn_id=conn_id,
            limit_frames=ctx.config.outbox_limit,
            limit_bytes=ctx.config.outbox_bytes,
            on_overflow=self._slow_reader,
        )
        self.req: Requests | None = None
        """The request handlers, from `welcome` on."""
        self._tasks: set[asyncio.Future[Any]] | None = None
        """Tasks and store writes in flight (a write's done-callback removes it)."""
        self._writes = 0
        """Store writes (sends, marks) of this connection in flight."""
        self._backlog: deque[bytes | str] | None = None
        """Messages received while held (or before `welcome`), in order."""
        self._paused = False
        """The transport is not reading (the backlog is long)."""
        self._wake: asyncio.Future[None] | None = None
        """Set while `_recv` waits for a message (before `welcome`)."""
        self._bad_in_row = 0
        self._count = 0
        """Messages received since `_count_since` (a run of max_frame_rate at most)."""
        self._count_since = time.monotonic()

    def _enter(self, phase: Phase) -> None:
        """Move to `phase` (a phase already reached or passed stays as it is)."""
        if phase > self._phase:
            assert phase in _NEXT[self._phase], (self._phase, phase)
            self._phase = phase

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        metrics = self.ctx.metrics
        metrics.connections.inc()
        ws = self.ws
        try:
            ws.forget_handshake()
            ws.set_sink(self._on_message)
            hello = await self._await_hello()
            await self._serve(hello)
            self._enter(Phase.OPEN)
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
        await self.out.stop()
        if self.req is not None:
            self.ctx.metrics.sessions.dec()
            await self.ctx.hub.detach(self)
            log.info("conn %d: closed (user %s, device %s)", self.conn_id, self.user, self.device)

    async def _close(self, code: int, reason: str) -> None:
        if self._phase is Phase.CLOSED:
            return
        self._enter(Phase.CLOSED)
        self.out.closed = True
        self.ctx.metrics.closes.labels(str(code), reason.replace(" ", "_")).inc()
        log.info("conn %d: closing %d (%s)", self.conn_id, code, reason)
        await self.ws.close(code, reason)

    def _close_drained(self, code: int, reason: str) -> None:
        """Stop acting on input now; close once the frames already queued (the last
        error frame) are written."""
        self._closing_input()
        self._spawn(self._drain_then_close(code, reason))

    async def _drain_then_close(self, code: int, reason: str) -> None:
        await self.out.drain()
        await self._close(code, reason)

    def _closing_input(self) -> None:
        """Act on and queue nothing more. A paused socket is read again, so that the
        closing handshake can complete (whatever else arrives is dropped)."""
        self._enter(Phase.CLOSING)
        self.out.closed = True
        self._backlog = None
        self._resume_if_short()

    def _slow_reader(self) -> None:
        """The outbox passed its limit (it is emptied): it loses nothing, it resumes
        with `since` and reads the rest from storage."""
        self._closing_input()
        self._spawn(self._close(CloseCode.TRY_AGAIN_LATER, "slow reader"))

    # ------------------------------------------------------------------ hello

    async def _await_hello(self) -> Hello:
        try:
            async with asyncio.timeout(self.ctx.config.policy.hello_timeout):
                while True:
                    hello = await self._hello_from(await self._recv())
                    if hello is not None:
                        return hello
        except TimeoutError:
            raise _Closing(CloseCode.POLICY_VIOLATION, "no hello in time") from None

    async def _hello_from(self, data: bytes | str) -> Hello | None:
        """The `hello` in a message before `welcome`, with the user verified; None
        after answering anything else."""
        try:
            m = decode_map(data)
        except FrameError:
            m = None
        if m is not None and m.get("t") != "hello":
            self._bad_in_row = 0
            await self.ws.send(
                self._error(ErrorCode.UNAUTHORIZED, "say hello first", request_id(m))
            )
            return None
        frame, answer, close = self._parse(data)
        if answer is not None:
            await self.ws.send(answer)
        if close:
            raise _Closing(CloseCode.POLICY_VIOLATION, "too many bad frames")
        if frame is None:
            return None
        assert isinstance(frame, Hello)
        try:
            self.user = self.ctx.auth.verify(frame.token)
        except AuthError as exc:
            log.info("conn %d: refused token (%s)", self.conn_id, exc)
            await self.ws.send(
                self._error(ErrorCode.UNAUTHORIZED, "bad or expired token", frame.id)
            )
            raise _Closing(CloseCode.POLICY_VIOLATION, "unauthorized") from None
        self.device = frame.device
        return frame

    async def _serve(self, hello: Hello) -> None:
        """Attach to the hub, say `welcome`, start the writer (catch-up, then live)."""
        ctx = self.ctx
        try:
            state = await ctx.hub.attach(self)
        except TooManyConnections:
            msg = "too many connections for this user"
            await self.ws.send(self._error(ErrorCode.RATE_LIMITED, msg, hello.id, 1000))
            raise _Closing(CloseCode.TRY_AGAIN_LATER, "too many connections") from None
        self.req = Requests(ctx, self, self.out, self.user, state, self.conn_id)
        ctx.metrics.sessions.inc()
        try:
            cur = await ctx.store.last_cur(self.user)
        except StorageError as exc:
            log.warning("conn %d: storage unavailable at hello: %s", self.conn_id, exc)
            await self.ws.send(self._error(ErrorCode.UNAVAILABLE, "storage unavailable", hello.id))
            raise _Closing(CloseCode.TRY_AGAIN_LATER, "storage unavailable") from None
        welcome = welcome_map(self.user, self.device, cur, now_ms(), hello.id)
        await self.ws.send(encode_map(welcome))
        log.info(
            "conn %d: hello user %s device %s since %s cur %d",
            self.conn_id,
            self.user,
            self.device,
            hello.since,
            cur,
        )
        self.out.user = self.user
        writer = self.out.writer = asyncio.create_task(self.out.run(hello.since, cur))
        writer.add_done_callback(self._writer_done)

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None or isinstance(exc, ConnectionClosed):
            return
        if isinstance(exc, StreamGap):
            log.error("conn %d: %s", self.conn_id, exc)
            self._spawn(self._close(CloseCode.INTERNAL_ERROR, "stream gap"))
        elif isinstance(exc, StorageError):
            log.warning("conn %d: storage unavailable while writing events", self.conn_id)
            self._spawn(self._close(CloseCode.TRY_AGAIN_LATER, "storage unavailable"))
        else:
            log.error("conn %d: writer failed", self.conn_id, exc_info=exc)
            self._spawn(self._close(CloseCode.INTERNAL_ERROR, "internal error"))

    # ------------------------------------------------------------------ input

    def _on_message(self, data: bytes | str) -> None:
        """The connection's sink: one whole client message, from the protocol callback."""
        if self._phase >= Phase.CLOSING:
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
        if self._phase is Phase.OPEN and not self._holds and not self._backlog:
            self._handle(data)
            return
        if self._backlog is None:
            self._backlog = deque()
        self._backlog.append(data)
        if len(self._backlog) >= _BACKLOG_PAUSE and not self._paused:
            self._paused = True
            self.ws.pause_reading()
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
                raise self.ws.close_exception()
            backlog = self._backlog
        data = backlog.popleft()
        if not backlog:
            self._backlog = None  # an idle connection keeps no deque (about 600 bytes)
        self._resume_if_short()
        return data

    def _release(self) -> None:
        """Handle the held messages, in order, until something holds them again."""
        backlog = self._backlog
        while backlog and self._phase is Phase.OPEN and not self._holds:
            self._handle(backlog.popleft())
        if not backlog:
            self._backlog = None
        self._resume_if_short()

    def _resume_if_short(self) -> None:
        if self._paused and (not self._backlog or len(self._backlog) < _BACKLOG_PAUSE // 2):
            self._paused = False
            self.ws.resume_reading()

    # ------------------------------------------------------------------ dispatch

    def _handle(self, data: bytes | str) -> None:
        frame, answer, close = self._parse(data)
        if answer is not None:
            self.out.reply(answer)
        if close:  # nothing after the last bad frame allowed is acted on
            self._close_drained(CloseCode.POLICY_VIOLATION, "too many bad frames")
            return
        if frame is None:
            return
        try:
            self._dispatch(frame)
        except FrameError as exc:
            self.out.reply(self._error(exc.code, exc.msg, exc.id, exc.retry_ms))
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
            ctx.metrics.frames_in.labels("invalid").inc()
            answer = self._error(exc.code, exc.msg, exc.id)
            if exc.code is not ErrorCode.BAD_FRAME:
                self._bad_in_row = 0
                return None, answer, False
            self._bad_in_row += 1
            return None, answer, self._bad_in_row >= ctx.config.policy.max_bad_frames
        self._bad_in_row = 0
        ctx.metrics.frame_in(frame.t)
        return frame, None, False

    def _dispatch(self, frame: Any) -> None:
        req = self.req
        assert req is not None
        if isinstance(frame, Send):
            req.send(frame)
        elif isinstance(frame, Mark):
            req.mark(frame)
        elif isinstance(frame, Typing):
            req.typing(frame)
        elif isinstance(frame, HistoryRequest):
            req.history(frame)
        elif isinstance(frame, ConvsRequest):
            req.convs(frame)
        elif isinstance(frame, Ping):
            self.out.reply(encode_map(pong_map(now_ms(), frame.id)))
        elif isinstance(frame, Hello):
            raise FrameError(ErrorCode.BAD_REQUEST, "already said hello", frame.id)

    def _error(
        self, code: ErrorCode, msg: str, rid: Any = None, retry_ms: int | None = None
    ) -> bytes:
        return error_frame(self.ctx, code, msg, rid, retry_ms)

    # ------------------------------------------------------------------ Host (handlers)

    def push_live(self, event: LiveEvent) -> None:
        """Hub callback: a live event for this user."""
        if event.cur and self.req is not None:
            self.req.stream_event()
        self.out.push((LIVE, event.cur, event.data, None, ""))

    def hold_for(self, coro: Awaitable[None]) -> None:
        """Run a read request; the messages after it wait for its answer (as they would
        behind a blocking read), so answers keep the order of the requests."""
        self._holds |= _HOLD_READ
        self._spawn(self._held(coro))

    async def _held(self, coro: Awaitable[None]) -> None:
        try:
            # A read's answer may be large (a history page): start it once what is
            # queued for this connection has gone to the socket, or after _READ_WAIT
            # (a reader with a standing backlog must still be answered), so that a
            # client that asks and never reads holds few answers here (the outbox's
            # byte limit closes it before they add up).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_READ_WAIT):
                    await self.out.written()
            await coro
        finally:
            self._holds &= ~_HOLD_READ
            self._release()

    def track(self, fut: asyncio.Future[Any]) -> None:
        """Count a store write in flight until its done-callback calls `untrack`; with
        too many in flight, later messages wait (and the socket stops being read)."""
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(fut)
        self._writes += 1
        if self._writes >= _MAX_IN_FLIGHT:
            self._holds |= _HOLD_WRITES

    def untrack(self, fut: asyncio.Future[Any]) -> None:
        if self._tasks is not None:
            self._tasks.discard(fut)
        self._writes -= 1
        if self._holds & _HOLD_WRITES and self._writes <= _MAX_IN_FLIGHT // 2:
            self._holds &= ~_HOLD_WRITES
            self._release()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
