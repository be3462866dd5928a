"""`ChatConnection`: websockets' server connection, handing messages straight to the session.

This is the one home of every use of websockets internals in chatd. Relied on
(websockets 14 to 17, hence the pin `websockets>=14,<18` in pyproject.toml; check
these on every upgrade):

- `process_event()`: overridden to hand whole messages to a sink (below);
- `protocol` (the sans-I/O `websockets.protocol.Protocol`): `state`, `send_binary()`,
  `data_to_send()`, `fail()`, `close_exc`;
- `send_data()`, `send_context()` and `paused` (write flow control): the writer puts
  frames straight into the protocol's buffer and writes them itself (`queue`, `write`);
- `request` / `response` after the handshake: the headers are dropped to save memory
  (`forget_handshake`);
- `connection_made()` / `connection_lost()` (asyncio's protocol callbacks, extended):
  every socket is counted in the node's connection budget from its accept to its close,
  and `shed()` closes one that has not said `hello` when the budget runs short
  (`chatd.admission`).

websockets' asyncio API queues every incoming message for `recv()`, which a
reader task awaits: a queue, a future and a task wake-up per frame. chatd
decodes and acts on a frame without awaiting anything (a write is queued in
the store with a done-callback), so the connection calls the session's sink
from the protocol callback instead. Everything else stays websockets': the
handshake, framing, masking, size limits (`max_size` applies to a whole
fragmented message), ping/pong, the closing handshake and write flow control.

The session applies read flow control itself, with `pause_reading()` (see
`Inbox.feed`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import State
from websockets.typing import BytesLike

from .admission import Admission

__all__ = ["MAX_FRAGMENTS", "ChatConnection", "Sink", "connection_class"]

log = logging.getLogger("chatd.connection")

_DATA = (Opcode.BINARY, Opcode.TEXT, Opcode.CONT)

Sink = Callable[[bytes | str], None]
"""Takes one whole message: bytes for a binary one, str for a text one."""

MAX_FRAGMENTS = 1024
"""Frames of one fragmented message at most (more: close 1009). `max_size` counts payload
bytes only, so without this a peer could grow a message forever with empty fragments."""


class ChatConnection(ServerConnection):
    # Class-level defaults: an idle connection stores none of these itself.
    _early: list[bytes | str] | None = None
    """Messages that arrived before the session took over (it gets them first)."""
    _parts: list[BytesLike] | None = None
    """The fragments so far of a fragmented message."""
    _text = False
    _flush_soon = False
    """`_flush` is scheduled: queued frames wait in the protocol's buffer until it runs."""
    conn_id = 0
    """The server's number for this connection, for its log lines (set at accept)."""
    admission: Admission | None = None
    """The node's connection budget (set on the class that `connection_class` makes)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sink: Sink | None = None

    # ------------------------------------------------------------------ budget

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.admission is not None:
            self.admission.opened(self)  # may shed this very connection (a full budget)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.admission is not None:
            self.admission.closed(self)

    def authenticated(self) -> None:
        """Its `hello` succeeded: it is never shed from now on."""
        if self.admission is not None:
            self.admission.authenticated(self)

    def shed(self) -> str:
        """Close at once to make room (`Sheddable`). An upgraded connection is told
        1013 first, in one write without waiting; the socket's file is released now."""
        if self.protocol.state is not State.OPEN:
            self.transport.abort()
            return "upgrade"
        self.protocol.fail(CloseCode.TRY_AGAIN_LATER, "server busy")
        data = b"".join(self.protocol.data_to_send())
        if data and not self.transport.is_closing():
            self.transport.write(data)
        self.transport.abort()
        return "hello"

    # ------------------------------------------------------------------ writing

    def writable(self) -> bool:
        """Frames queued now go out without waiting: the connection is open and the
        socket's buffer is below its high mark."""
        return (
            self.protocol.state is State.OPEN
            and not self.paused
            and not self.transport.is_closing()
        )

    def queue(self, frames: Sequence[bytes]) -> None:
        """Put binary frames in the protocol's outgoing buffer (only when `writable()`).
        One socket write at the end of this loop iteration carries every frame queued
        in it, unless websockets writes the buffer first; both keep their order."""
        proto = self.protocol
        for frame in frames:
            proto.send_binary(frame)
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        if self.transport.is_closing():
            return  # the socket is gone: the client resumes with `since`
        try:
            if self.protocol.state is State.OPEN:
                data = self.protocol.data_to_send()
                if data:  # else websockets wrote them already
                    self.transport.write(b"".join(data))
            else:
                self.send_data()  # closing: websockets' own write (it may half-close)
        except Exception as exc:  # as websockets' send_context does
            log.info("conn %d: write failed: %s", self.conn_id, type(exc).__name__)
            self.transport.abort()

    async def write(self, frames: Sequence[bytes]) -> None:
        """Write binary frames in order with one socket write, then wait while the
        socket's buffer is above its high mark. `send_context()` checks the connection
        is open before; nothing awaits in between, so no close can slip in. Raises
        ConnectionClosed when it is not open."""
        async with self.send_context():
            proto = self.protocol
            for frame in frames:
                proto.send_binary(frame)
            self.transport.write(b"".join(proto.data_to_send()))

    # ------------------------------------------------------------------ reading

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def close_exception(self) -> Exception:
        """The ConnectionClosed to raise for a connection that is closed."""
        return self.protocol.close_exc

    def forget_handshake(self) -> None:
        """Drop the upgrade's headers, which websockets keeps for the connection's lifetime.

        chatd reads nothing from them after the upgrade, and they are the largest part
        of an idle connection's memory (about 4 KiB). The request object itself stays:
        websockets takes a non-None `request` to mean "handshake done", and its parser
        still refers to it, so its headers are emptied in place.
        """
        if self.request is not None:
            self.request.headers.clear()
        self.response = None

    def set_sink(self, sink: Sink | None) -> None:
        """From now on every whole message goes to `sink` (None: to nobody)."""
        self._sink = sink
        early = self._early
        if early is not None:
            self._early = None
            if sink is not None:
                for data in early:
                    sink(data)

    def process_event(self, event: Any) -> None:
        if self.request is None or not isinstance(event, Frame):
            super().process_event(event)  # the handshake request
            return
        op = event.opcode
        if self.protocol.state is not State.OPEN and op in _DATA:
            return  # failed (or closing) already: a frame parsed with the failing one
        if op is Opcode.BINARY or op is Opcode.TEXT:
            if not event.fin:
                self._parts = [event.data]
                self._text = op is Opcode.TEXT
                return
            self._deliver(event.data, op is Opcode.TEXT)
        elif op is Opcode.CONT:
            parts = self._parts
            if parts is None:  # the protocol layer refuses a stray continuation first
                return
            parts.append(event.data)
            if len(parts) > MAX_FRAGMENTS:
                self._parts = None
                self.protocol.fail(CloseCode.MESSAGE_TOO_BIG, "too many fragments")
                self.send_data()
                return
            if event.fin:
                self._parts = None
                self._deliver(b"".join(parts), self._text)
        else:
            super().process_event(event)  # PING, PONG, CLOSE

    def _deliver(self, data: BytesLike, text: bool) -> None:
        raw = data if type(data) is bytes else bytes(data)
        msg: bytes | str = raw.decode("utf-8", "replace") if text else raw
        sink = self._sink
        if sink is not None:
            sink(msg)
        elif self._early is None:
            self._early = [msg]
        else:
            self._early.append(msg)


def connection_class(admission: Admission) -> type[ChatConnection]:
    """ChatConnection counted in `admission` (a class per server: websockets builds the
    connections itself, from a class)."""

    class AdmittedConnection(ChatConnection):
        pass

    AdmittedConnection.admission = admission
    return AdmittedConnection
