"""`Requests`: what one connection does with each request frame after `hello`.

`send` and the marks are queued in the store with a done-callback (no task per
message): the callback answers (`sent`, or a receipt and `ok`) through the outbox, in
`cur` order, and publishes the stored event to both people's other connections.
`history` and `convs` are reads: the session holds the messages after them until they
are answered (`Host.hold_for`), so answers keep the order of the requests. Every
failure becomes exactly one `error` frame (`fail`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from websockets.exceptions import ConnectionClosed

from protocol import (
    ConvsRequest,
    ErrorCode,
    FrameError,
    HistoryRequest,
    Mark,
    Send,
    Typing,
    encode_map,
    error_map,
    ok_map,
    sent_map,
    typing_map,
)
from storage.base import (
    MarkOutcome,
    NotAMember,
    SendOutcome,
    StorageRejected,
    StorageUnavailable,
    StoredMessage,
    UptoTooHigh,
)

from .broker import LiveEvent
from .context import Context
from .hub import UserState
from .limits import Kind
from .outbox import Outbox
from .replies import convs_reply, history_reply
from .sequencer import OWN_MARK, OWN_SENT
from .wire import message_map, receipt_event_map

log = logging.getLogger("chatd.session")

__all__ = ["Host", "Requests", "error_frame", "now_ms"]

_MAX_IN_FLIGHT = 256
"""Writes (sends, marks) of one connection in flight before its messages are held."""
_MARKS_KEPT = 1024
"""(conv, kind) watermarks a connection remembers at most (then it starts over)."""

Watermarks = dict[tuple[int | str, str], int]

_LIMITED = {
    "send": "too many messages; retry later",
    "mark": "too many refused marks",
    "typing": "typing too often",
}


def now_ms() -> int:
    return int(time.time() * 1000)


def error_frame(
    ctx: Context, code: ErrorCode, msg: str, rid: Any = None, retry_ms: int | None = None
) -> bytes:
    """An `error` frame, counted in `chatd_errors` by code (every error frame sent is
    made here)."""
    ctx.metrics.errors.labels(code).inc()
    return encode_map(error_map(code, msg, rid, retry_ms))


def _remember(table: Watermarks | None, conv: int | str, kind: str, value: int) -> Watermarks:
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


def _failure(fut: asyncio.Future[Any]) -> BaseException | None:
    """What a finished store write raised (a cancelled one: storage unavailable), or None."""
    return fut.exception() if not fut.cancelled() else StorageUnavailable("cancelled")


def _sent(rid: Any, m: StoredMessage, cur: int, dup: bool) -> bytes:
    return encode_map(sent_map(rid, m.cmid, m.mid, m.conv, m.seq, m.ts, cur, dup))


class Host(Protocol):
    """What the handlers need from their session."""

    def hold_for(self, coro: Awaitable[None]) -> None:
        """Run a read request (it answers, errors included); the messages after it wait
        for its answer."""

    def hold_writes(self, on: bool) -> None:
        """Hold the messages after this one while too many writes are in flight (or
        release them)."""

    def hold_fleet(self, on: bool) -> None:
        """Hold the messages after this one while the fleet's rate check of it is
        answered (or release them)."""


class _InFlight:
    """The store writes (sends, marks) of one connection in flight: at _MAX_IN_FLIGHT
    the host holds the messages after them (and stops reading the socket), until half
    of them have finished."""

    __slots__ = ("_futs", "_host")

    def __init__(self, host: Host) -> None:
        self._host = host
        self._futs: set[asyncio.Future[Any]] | None = None

    def add(self, fut: asyncio.Future[Any]) -> None:
        """Count a write until its done-callback calls `discard`."""
        if self._futs is None:
            self._futs = set()
        self._futs.add(fut)
        if len(self._futs) >= _MAX_IN_FLIGHT:
            self._host.hold_writes(True)

    def discard(self, fut: asyncio.Future[Any]) -> None:
        futs = self._futs
        if futs is not None:
            futs.discard(fut)
            if len(futs) == _MAX_IN_FLIGHT // 2:
                self._host.hold_writes(False)

    async def settle(self) -> None:
        while self._futs:  # (a fleet answer may start a write meanwhile)
            await asyncio.gather(*self._futs, return_exceptions=True)


class Requests:
    """The request handlers of one authenticated connection."""

    __slots__ = (
        "_capped",
        "_foreign",
        "_in_flight",
        "_marked",
        "conn_id",
        "ctx",
        "host",
        "out",
        "state",
        "user",
    )

    def __init__(
        self, ctx: Context, host: Host, out: Outbox, user: str, state: UserState, conn_id: int
    ) -> None:
        self.ctx = ctx
        self.host = host
        self.out = out
        self.user = user
        self.state = state
        self.conn_id = conn_id
        self._marked: Watermarks | None = None
        """(conv, kind) -> this user's watermark as a mark of this connection last
        committed it: a mark at or below it is answered without a write."""
        self._capped: Watermarks | None = None
        """(conv, kind) -> the highest `upto` of a mark that changed nothing because no
        message to this user lies above the watermark (it was capped): the same holds
        for marks up to it until a stream event reaches this connection (dropped then)."""
        self._foreign: set[int | str] | None = None
        """Conversations a mark of this connection was refused on (not the user's)."""
        self._in_flight = _InFlight(host)

    def stream_event(self) -> None:
        """A stored event reached this connection: perhaps a message to this user, so
        a capped mark may change something now, and a conversation may exist now."""
        self._capped = None
        self._foreign = None

    def _remember_foreign(self, conv: int | str) -> None:
        """A mark on `conv` was refused (not the user's, or no message yet): later marks
        on it are refused without a write until a stream event arrives. Costs the
        user's budget of refused marks."""
        self.state.waste.take(time.monotonic())
        if self._foreign is None or len(self._foreign) >= _MARKS_KEPT:
            self._foreign = set()
        self._foreign.add(conv)

    async def settle(self) -> None:
        """Until the writes in flight have finished (they are durable either way; their
        replies may be lost with the connection)."""
        await self._in_flight.settle()

    # ---------------------------------------------------------------- errors

    def fail(self, rid: Any, exc: BaseException) -> None:
        """Answer the request `rid` that raised `exc` with exactly one error frame."""
        if isinstance(exc, FrameError):
            frame = error_frame(self.ctx, exc.code, exc.msg, rid, exc.retry_ms)
        elif isinstance(exc, StorageUnavailable):
            self.ctx.metrics.storage_failures["unavailable"] += 1
            log.warning("conn %d: storage unavailable", self.conn_id)
            frame = error_frame(
                self.ctx, ErrorCode.UNAVAILABLE, "storage unavailable; retry later", rid
            )
        elif isinstance(exc, ConnectionClosed):
            return
        else:
            if isinstance(exc, StorageRejected):
                self.ctx.metrics.storage_failures["rejected"] += 1
            log.error("conn %d: request failed", self.conn_id, exc_info=exc)
            frame = error_frame(self.ctx, ErrorCode.INTERNAL, "internal error", rid)
        self.out.reply(frame)

    async def guard(self, rid: Any, coro: Awaitable[None]) -> None:
        """Run a request; map what it raises to exactly one error frame."""
        try:
            await coro
        except Exception as exc:
            self.fail(rid, exc)

    def _limited(self, what: str, wait: float, rid: Any = None) -> FrameError:
        """The `rate_limited` error of request `rid` over a rate (`wait`: seconds until
        it would pass), counted."""
        self.ctx.metrics.rate_limited[what] += 1
        retry = math.ceil(wait * 1000)
        return FrameError(ErrorCode.RATE_LIMITED, _LIMITED[what], rid, retry_ms=retry)

    def _publish(self, events: list[tuple[str, LiveEvent]]) -> None:
        self.ctx.metrics.published_at = time.time()  # the in-process broker's lag stamp
        try:
            self.ctx.broker.publish(events)
        except Exception:
            # Stored already: receivers find it by gap fill or on their next connect.
            log.warning("conn %d: publish failed; receivers will catch up", self.conn_id)

    # ---------------------------------------------------------------- send

    def send(self, f: Send) -> None:
        """Queue a send in the store; `_send_done` answers it (no task per message)."""
        try:
            self._start_send(f)
        except Exception as exc:
            self.fail(f.id, exc)

    def _start_send(self, f: Send) -> None:
        started = time.perf_counter()  # the frame is read: `chatd_send_seconds` starts
        wait = self.state.sends.take(time.monotonic())
        refused: FrameError | None = None
        if wait > 0.0:
            refused = self._limited("send", wait)
        elif f.to == self.user:
            refused = FrameError(ErrorCode.BAD_REQUEST, "cannot send to yourself")
        if refused is not None:
            # A self-send took a token (a flood of them is limited like sends); a retry
            # of a stored message gives it back, as any duplicate does.
            took = wait <= 0.0
            # Held like a read: one lookup at a time per connection, and the frames
            # after it wait (a flood of refused sends cannot queue unbounded reads).
            self.host.hold_for(self.guard(f.id, self._dup_or_refuse(f, refused, took)))
            return
        fleet = self.ctx.limits.take(Kind.SEND, self.user)
        if fleet is None:
            self._submit(f, started, False)
        else:
            self._after_fleet(f.id, fleet, lambda wait: self._fleet_send(f, started, wait))

    def _after_fleet(
        self, rid: Any, fut: asyncio.Future[float | None], then: Callable[[float | None], None]
    ) -> None:
        """Hold what follows until the fleet answers `fut`, then `then(answer)`: frames
        keep their order (a send's `sent` and `seq`, typing before the message)."""
        self.host.hold_fleet(True)
        self._in_flight.add(fut)  # a drain waits for it like for a write

        def answered(done: asyncio.Future[float | None]) -> None:
            self._in_flight.discard(done)
            try:
                then(done.result())
            except Exception as exc:
                self.fail(rid, exc)
            finally:  # after `then`: the next frame goes after this one
                self.host.hold_fleet(False)

        fut.add_done_callback(answered)

    def _fleet_send(self, f: Send, started: float, wait: float | None) -> None:
        """The fleet's answer to a send this node's bucket allowed."""
        if not wait:  # allowed, or unanswered (this node's bucket decided)
            self._submit(f, started, wait is not None)
            return
        self.state.sends.refund()
        refused = self._limited("send", wait)
        self.host.hold_for(self.guard(f.id, self._dup_or_refuse(f, refused, False)))

    def _submit(self, f: Send, started: float, fleet_took: bool) -> None:
        """Into the store; `_send_done` answers it."""
        pend = self.out.expect_own(f.cmid)
        try:
            fut = self.ctx.store.send(self.user, f.to, f.cmid, f.body, f.type, now_ms())
        except BaseException:
            if pend is not None:
                self.out.own_done(f.cmid, pend, None)
            raise
        self._in_flight.add(fut)
        fut.add_done_callback(lambda done: self._send_done(f, pend, started, fleet_took, done))

    async def _dup_or_refuse(self, f: Send, refused: FrameError, took: bool) -> None:
        """A send refused here (over the send rate, or to oneself): a retry of a stored
        (sender, cmid) still gets the original `sent` with `dup`, whatever its `to` and
        body now; any other send gets `refused`. `took`: it used up a rate token."""
        prior = await self.ctx.store.find_sent(self.user, f.cmid)
        if prior is None:
            raise refused
        if took:
            self._refund_duplicate()
        self.ctx.metrics.duplicates.inc()
        self.out.reply(_sent(f.id, prior.message, prior.sender_cur, dup=True))

    def _refund_duplicate(self, fleet_took: bool = False) -> None:
        """A duplicate stores nothing: it costs no send token while the user's budget of
        free duplicates lasts (an honest client's retries); past it, a loop of them
        costs like sends and is throttled like them."""
        if self.state.waste.take(time.monotonic()) == 0.0:
            self.state.sends.refund()
            if fleet_took:
                self.ctx.limits.refund(Kind.SEND, self.user)

    def _send_done(
        self,
        f: Send,
        pend: asyncio.Future[bytes | None] | None,
        started: float,
        fleet_took: bool,
        fut: asyncio.Future[SendOutcome],
    ) -> None:
        self._in_flight.discard(fut)
        ctx = self.ctx
        try:
            exc = _failure(fut)
            if exc is not None:
                if pend is not None:
                    self.out.own_done(f.cmid, pend, None)
                self.fail(f.id, exc)
                return
            out = fut.result()
            ctx.metrics.commit_seconds.observe(time.perf_counter() - started)
            m = out.message
            if out.dup:
                self._refund_duplicate(fleet_took)
                ctx.metrics.duplicates.inc()
                if pend is not None:
                    self.out.own_done(f.cmid, pend, None)
                self.out.reply(_sent(f.id, m, out.sender_cur, dup=True))
                ctx.metrics.send_seconds.observe(time.perf_counter() - started)
                return
            ctx.metrics.messages.inc()
            sent = _sent(f.id, m, out.sender_cur, dup=False)
            if pend is not None:
                self.out.own_done(f.cmid, pend, sent)
            self.out.push(
                (OWN_SENT, out.sender_cur, sent, None, f.cmid if pend is not None else "")
            )
            ctx.metrics.send_seconds.observe(time.perf_counter() - started)
            mine = message_map(m, out.sender_cur)
            theirs = dict(mine)
            theirs["cur"] = out.recipient_cur
            self._publish(
                [
                    (self.user, LiveEvent(out.sender_cur, encode_map(mine))),
                    (m.recipient, LiveEvent(out.recipient_cur, encode_map(theirs))),
                ]
            )
        except Exception as exc:
            self.fail(f.id, exc)

    # ---------------------------------------------------------------- marks

    def mark(self, f: Mark) -> None:
        """Queue a mark in the store; `_mark_done` answers it."""
        try:
            self._start_mark(f)
        except Exception as exc:
            self.fail(f.id, exc)

    def _start_mark(self, f: Mark) -> None:
        if type(f.conv) is not str or (self._foreign is not None and f.conv in self._foreign):
            raise FrameError(ErrorCode.BAD_REQUEST, "not a conversation of yours")
        wait = self.state.waste.wait(time.monotonic())
        if wait > 0.0:  # marks on conversations not the user's used up the budget
            raise self._limited("mark", wait)
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
                self.out.reply(encode_map(ok_map(f.id)))
            return
        fut = self.ctx.store.mark(self.user, f.conv, f.kind, f.upto, now_ms())
        self._in_flight.add(fut)
        fut.add_done_callback(lambda done: self._mark_done(f, done))

    def _mark_done(self, f: Mark, fut: asyncio.Future[MarkOutcome]) -> None:
        self._in_flight.discard(fut)
        try:
            exc = _failure(fut)
            if isinstance(exc, NotAMember):
                self._remember_foreign(f.conv)
                exc = FrameError(ErrorCode.BAD_REQUEST, "not a conversation of yours")
            elif isinstance(exc, UptoTooHigh):
                exc = FrameError(
                    ErrorCode.BAD_REQUEST, "'upto' is above the conversation's last seq"
                )
            if exc is not None:
                self.fail(f.id, exc)
                return
            out = fut.result()
            r = out.receipt
            self._marked = _remember(self._marked, f.conv, f.kind, out.watermark)
            if r is None and out.watermark < f.upto:  # capped: no message to us up there
                self._capped = _remember(self._capped, f.conv, f.kind, f.upto)
            ok = encode_map(ok_map(f.id)) if f.id is not None else None
            if r is None:
                if ok is not None:
                    self.out.reply(ok)
                return
            self.ctx.metrics.receipts.labels(r.kind).inc()
            mine = encode_map(receipt_event_map(r, out.marker_cur))
            self.out.push((OWN_MARK, out.marker_cur, mine, ok, ""))
            theirs = encode_map(receipt_event_map(r, out.peer_cur))
            self._publish(
                [
                    (self.user, LiveEvent(out.marker_cur, mine)),
                    (out.peer, LiveEvent(out.peer_cur, theirs)),
                ]
            )
        except Exception as exc:
            self.fail(f.id, exc)

    # ---------------------------------------------------------------- typing

    def typing(self, f: Typing) -> None:
        if f.to == self.user:
            raise FrameError(ErrorCode.BAD_REQUEST, "cannot type to yourself", f.id)
        wait = self.state.typing.take(time.monotonic())
        if wait > 0.0:
            self._typing_refused(f, wait)
            return
        fleet = self.ctx.limits.take(Kind.TYPING, self.user)
        if fleet is None:
            self._typing_go(f)
        else:
            self._after_fleet(f.id, fleet, lambda wait: self._fleet_typing(f, wait))

    def _fleet_typing(self, f: Typing, wait: float | None) -> None:
        if not wait:
            self._typing_go(f)
        else:
            self.state.typing.refund()
            self._typing_refused(f, wait)

    def _typing_refused(self, f: Typing, wait: float) -> None:
        """Over the typing rate: an error if it asked for an answer, else dropped."""
        refused = self._limited("typing", wait, f.id)
        if f.id is not None:
            raise refused

    def _typing_go(self, f: Typing) -> None:
        data = encode_map(typing_map(self.user, f.on))
        self._publish([(f.to, LiveEvent(0, data))])
        if f.id is not None:
            self.out.reply(encode_map(ok_map(f.id)))

    # ---------------------------------------------------------------- reads

    def history(self, f: HistoryRequest) -> None:
        self.host.hold_for(self.guard(f.id, self._answer(history_reply(self.ctx, self.user, f))))

    def convs(self, f: ConvsRequest) -> None:
        self.host.hold_for(self.guard(f.id, self._answer(convs_reply(self.ctx, self.user, f))))

    async def _answer(self, reply: Awaitable[bytes]) -> None:
        self.out.reply(await reply)
