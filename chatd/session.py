"""One session per WebSocket connection: hello, lifecycle, dispatch, and the state of the
connection.

The path of a frame: `ChatConnection` hands each whole message to the connection's
`Inbox` (no reader task), which hands it to `_handle` at once unless something holds
the messages back; `_handle` decodes it and dispatches it to the request handlers
(`handlers.Requests`).
Everything the connection writes goes through its `Outbox`, whose `Sequencer` keeps
the user's stream in `cur` order.

The connection's phase, one value (h11-style; phases only move forward):

| phase   | a message that arrives                      | a frame to write         |
|---------|---------------------------------------------|--------------------------|
| HELLO   | waits for the hello loop (`inbox.next`)     | written at once (`send`) |
| OPEN    | handled, or kept in order (`inbox.holds`)   | through the outbox       |
| CLOSING | dropped                                     | dropped                  |
| CLOSED  | dropped (the closing handshake is on)       | dropped                  |

While OPEN, messages are kept (in order, handled when released) while a read request
(`history`, `convs`, a duplicate lookup) is answered, or while too many of this
connection's writes are in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
    encode_map,
    pong_map,
    welcome_map,
)
from storage.base import StorageError

from .broker import LiveEvent
from .connection import ChatConnection
from .context import Context
from .handlers import Requests, error_frame, now_ms
from .handshake import Closing, Handshake, refuse
from .hub import TooManyConnections
from .inbox import HOLD_FLEET, HOLD_HELLO, HOLD_READ, HOLD_WRITES, Inbox
from .outbox import Outbox, writer_close
from .sequencer import LIVE

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

_READ_WAIT = 1.0
"""Seconds a history / convs read waits at most for the connection's queued frames."""


class Session:
    __slots__ = (
        "_bad_in_row",
        "_phase",
        "_tasks",
        "conn_id",
        "ctx",
        "device",
        "inbox",
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
        self.out = Outbox(
            ws,
            ctx.store,
            ctx.metrics,
            conn_id=conn_id,
            limit_frames=ctx.config.outbox_limit,
            limit_bytes=ctx.config.outbox_bytes,
            on_overflow=self._slow_reader,
            window=ctx.config.reorder_window,
        )
        self.req: Requests | None = None
        """The request handlers, from `welcome` on."""
        self._tasks: set[asyncio.Future[Any]] | None = None
        """Tasks of this session in flight (closes, reads)."""
        self.inbox = Inbox(ws, ctx.config.policy.max_frame_rate, self._handle, self._flood)
        self._bad_in_row = 0

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
            ws.set_sink(self.inbox.feed)
            shake = Handshake(self.ctx, ws, self.inbox, self.conn_id, self._parse, self._mapped)
            greeted = await shake.run()
            self.user, self.device = greeted.user, greeted.frame.device
            hello = greeted.frame
            await self._serve(hello)
            self._enter(Phase.OPEN)
            self.inbox.release(HOLD_HELLO)
            await ws.wait_closed()
        except Closing as exc:
            if self._phase is Phase.HELLO:
                metrics.hello_failed(exc.reason)
            await self._close(exc.code, exc.reason)
        except ConnectionClosed:
            pass
        finally:
            ws.set_sink(None)
            metrics.connections.dec()
            await self._teardown()

    async def _teardown(self) -> None:
        self._closing_input()
        if self.req is not None:
            await self.req.settle()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.out.stop()
        if self.req is not None:
            self.ctx.metrics.sessions.dec()
            await self.ctx.hub.detach(self)
            log.info("conn %d: closed (user %r, device %r)", self.conn_id, self.user, self.device)

    async def _close(self, code: int, reason: str) -> None:
        if self._phase is Phase.CLOSED:
            return
        self._enter(Phase.CLOSED)
        self.out.closed = True
        self.ctx.metrics.closes.labels(str(code), reason.replace(" ", "_")).inc()
        log.info("conn %d: closing %d (%s)", self.conn_id, code, reason)
        await self.ws.close(code, reason)

    async def drain(self) -> None:
        """Shutdown (the server drains): act on no more input, let the writes in flight
        commit and their `sent` go out, then close 1001 (the client resumes elsewhere
        with `since`; what it sent after this and got no `sent` for, it sends again)."""
        if self._phase is not Phase.OPEN:
            return
        self.inbox.shut()
        if self.req is not None:
            await self.req.settle()
        await self.out.drain()
        await self._close(CloseCode.GOING_AWAY, "going away")

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
        self.inbox.shut()

    def _slow_reader(self) -> None:
        """The outbox passed its limit (it is emptied): it loses nothing, it resumes
        with `since` and reads the rest from storage."""
        self._closing_input()
        self._spawn(self._close(CloseCode.TRY_AGAIN_LATER, "slow reader"))

    # ------------------------------------------------------------------ hello

    async def _serve(self, hello: Hello) -> None:
        """Attach to the hub, say `welcome`, start the writer (catch-up, then live)."""
        self.ws.authenticated()  # the token is good: never shed to make room from now on
        ctx = self.ctx
        try:
            state = await ctx.hub.attach(self)
        except TooManyConnections:
            ctx.metrics.rate_limited["connections"] += 1
            msg = "too many connections for this user"
            close = (CloseCode.TRY_AGAIN_LATER, "too many connections")
            await refuse(ctx, self.ws, ErrorCode.RATE_LIMITED, msg, hello.id, close, retry_ms=1000)
        self.req = Requests(ctx, self, self.out, self.user, state, self.conn_id)
        ctx.metrics.sessions.inc()
        try:
            cur = await ctx.store.last_cur(self.user)
        except StorageError as exc:
            log.warning("conn %d: storage unavailable at hello: %s", self.conn_id, exc)
            close = (CloseCode.TRY_AGAIN_LATER, "storage unavailable")
            await refuse(
                ctx, self.ws, ErrorCode.UNAVAILABLE, "storage unavailable", hello.id, close
            )
        if hello.since is not None:
            ctx.metrics.resumes += 1
        welcome = welcome_map(self.user, self.device, cur, now_ms(), hello.id)
        await self.ws.send(encode_map(welcome))
        who = (self.conn_id, self.user, self.device, hello.since, cur)
        log.info("conn %d: hello user %r device %r since %s cur %d", *who)
        self.out.user = self.user
        self.out.replay = state.replay
        writer = self.out.writer = asyncio.create_task(self.out.run(hello.since, cur))
        writer.add_done_callback(self._writer_done)

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None or isinstance(exc, ConnectionClosed):
            return
        self._spawn(self._close(*writer_close(exc, self.conn_id)))

    def _flood(self) -> None:
        self._close_drained(CloseCode.POLICY_VIOLATION, "too many frames")

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
            self.out.reply(error_frame(self.ctx, exc.code, exc.msg, exc.id, exc.retry_ms))
        except Exception:  # a bug: never let it into websockets' protocol callback
            log.exception("conn %d: failed to handle a %s frame", self.conn_id, frame.t)
            self._close_drained(CloseCode.INTERNAL_ERROR, "internal error")

    def _mapped(self) -> None:
        self._bad_in_row = 0

    def _parse(self, data: bytes | str) -> tuple[Any, bytes | None, bool]:
        """Decode a message: (frame, None, False), or (None, the error frame answering it,
        whether it was the last bad frame in a row allowed)."""
        ctx = self.ctx
        try:
            frame = decode_client(data, ctx.config.limits)
        except FrameError as exc:
            ctx.metrics.frames_in.labels("invalid").inc()
            answer = error_frame(self.ctx, exc.code, exc.msg, exc.id)
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

    # ------------------------------------------------------------------ Host (handlers)

    def push_live(self, event: LiveEvent) -> None:
        """Hub callback: a live event for this user."""
        if event.cur and self.req is not None:
            self.req.stream_event()
        self.out.push((LIVE, event.cur, event.data, None, ""))

    def check_position(self, stored: int) -> None:
        """Hub callback: storage holds this user's stream up to `stored`."""
        if self._phase is Phase.OPEN:
            self.out.check(stored)

    def hold_for(self, coro: Awaitable[None]) -> None:
        """Run a read request; the messages after it wait for its answer (as they would
        behind a blocking read), so answers keep the order of the requests."""
        self.inbox.hold(HOLD_READ)
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
            req = self.req
            assert req is not None
            async with req.state.reads:  # the user's share of the read pool
                await coro
        finally:
            self.inbox.release(HOLD_READ)

    def hold_fleet(self, on: bool) -> None:
        """Hold later messages while the fleet answers a rate check (or release them)."""
        if on:
            self.inbox.hold(HOLD_FLEET)
        else:
            self.inbox.release(HOLD_FLEET)

    def hold_writes(self, on: bool) -> None:
        """Hold later messages while too many writes are in flight (or release them)."""
        if on:
            self.inbox.hold(HOLD_WRITES)
        else:
            self.inbox.release(HOLD_WRITES)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
