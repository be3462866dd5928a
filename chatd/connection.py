"""`ChatConnection`: websockets' server connection, handing messages straight to the session.

websockets' asyncio API queues every incoming message for `recv()`, which a
reader task awaits: a queue, a future and a task wake-up per frame. chatd
decodes and acts on a frame without awaiting anything (a write is queued in
the store with a done-callback), so the connection calls the session's sink
from the protocol callback instead. Everything else stays websockets': the
handshake, framing, masking, size limits (`max_size` applies to a whole
fragmented message), ping/pong, the closing handshake and write flow control.

The session applies read flow control itself, with `transport.pause_reading()`
(see `Session._on_message`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import State
from websockets.typing import BytesLike

__all__ = ["MAX_FRAGMENTS", "ChatConnection", "Sink"]

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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sink: Sink | None = None

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
