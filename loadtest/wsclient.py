"""A lean WebSocket client connection (RFC 6455) for the load tester.

One `asyncio.Protocol` per connection: no reader task, no queue, no per-frame
objects. Binary frames from the server are handed to a callback as bytes, in
`data_received`. Client frames use an all-zero masking key (valid framing: the
server unmasks it like any other key) so that sending costs one header + one
write. Pings are answered, fragmented messages reassembled.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from collections.abc import Callable

__all__ = ["HandshakeError", "WsConn"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_ZERO = b"\x00\x00\x00\x00"
_H16 = struct.Struct(">BBH")
_H64 = struct.Struct(">BBQ")
_MAX_HEAD = 16384


class HandshakeError(Exception):
    pass


class WsConn(asyncio.Protocol):
    """`on_frame(conn, payload)` for each binary message; `on_lost(conn)` once, at the end."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        on_frame: Callable[[WsConn, bytes], None],
        on_lost: Callable[[WsConn], None],
        subprotocol: str = "chatd.v1",
    ) -> None:
        self.host = host
        self.port = port
        self.path = path
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.subprotocol = subprotocol
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.is_open = False
        self.closed = False
        self._buf = b""
        self._frag: list[bytes] | None = None
        self._key = base64.b64encode(os.urandom(16))

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        req = (
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self._key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {self.subprotocol}\r\n\r\n"
        )
        self.transport.write(req.encode())  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if self.is_open:
            self._frames(data)
            return
        buf = self._buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self._buf = buf
            if len(buf) > _MAX_HEAD:
                self._fail(HandshakeError("response head too long"))
            return
        head, rest = buf[:end], buf[end + 4 :]
        self._buf = b""
        lines = head.decode("latin-1").split("\r\n")
        if not lines[0].startswith("HTTP/1.1 101"):
            self._fail(HandshakeError(f"handshake refused: {lines[0][:80]}"))
            return
        want = base64.b64encode(hashlib.sha1(self._key + _GUID).digest()).decode()
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "sec-websocket-accept":
                accept = value.strip()
        if accept != want:
            self._fail(HandshakeError("bad Sec-WebSocket-Accept"))
            return
        self.is_open = True
        if not self.opened.done():
            self.opened.set_result(None)
        if rest:
            self._frames(rest)

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_open = False
        if not self.opened.done():
            self.opened.set_exception(HandshakeError("connection closed during handshake"))
        if not self.closed:
            self.closed = True
            self.on_lost(self)

    # ------------------------------------------------------------------ frames

    def _frames(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        pos = 0
        n = len(data)
        while n - pos >= 2:
            ln = data[pos + 1] & 0x7F
            if ln < 126:
                hl = 2
            elif ln == 126:
                if n - pos < 4:
                    break
                ln = (data[pos + 2] << 8) | data[pos + 3]
                hl = 4
            else:
                if n - pos < 10:
                    break
                ln = int.from_bytes(data[pos + 2 : pos + 10], "big")
                hl = 10
            end = pos + hl + ln
            if end > n:
                break
            b0 = data[pos]
            payload = data[pos + hl : end]
            pos = end
            op = b0 & 0x0F
            if op == 2 and b0 & 0x80:
                self.on_frame(self, payload)
            elif op in (0, 1, 2):
                if op:
                    self._frag = [payload]
                elif self._frag is not None:
                    self._frag.append(payload)
                if b0 & 0x80 and self._frag is not None:
                    whole = b"".join(self._frag)
                    self._frag = None
                    if op == 2 or op == 0:
                        self.on_frame(self, whole)
            elif op == 9:
                self._write(0x8A, payload)
            elif op == 8:
                if not self.closed:
                    self._write(0x88, payload[:2])
                if self.transport is not None:
                    self.transport.close()
                return
        if pos < n:
            self._buf = data[pos:]

    def _write(self, b0: int, payload: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        ln = len(payload)
        if ln < 126:
            t.write(bytes((b0, 0x80 | ln)) + _ZERO + payload)
        elif ln < 65536:
            t.write(_H16.pack(b0, 0xFE, ln) + _ZERO + payload)
        else:
            t.write(_H64.pack(b0, 0xFF, ln) + _ZERO + payload)

    def send(self, payload: bytes) -> None:
        """Write one binary message (dropped silently if the socket is closing)."""
        self._write(0x82, payload)

    def close(self, code: int = 1000) -> None:
        """Send a close frame and close the socket; `on_lost` is not called for it."""
        self.closed = True
        self.is_open = False
        if self.transport is not None and not self.transport.is_closing():
            self._write(0x88, code.to_bytes(2, "big"))
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.is_open = False
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
