"""Helpers for end-to-end tests: a raw frame recorder, event collectors, HTTP GET.

Everything here synchronises on frames arriving (with timeouts), never on sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from chatd.client import ChatClient
from protocol import SUBPROTOCOL, Msg, Receipt, ServerFrame, Synced, decode_map, encode_map
from protocol.codec import parse_server

TIMEOUT = 5.0

Pred = Callable[[dict[str, Any]], bool]


def is_t(t: str, **keys: Any) -> Pred:
    """A predicate on raw frames: `t` matches and every given key has that value."""

    def pred(m: dict[str, Any]) -> bool:
        return m.get("t") == t and all(m.get(k) == v for k, v in keys.items())

    return pred


class RawConn:
    """A WebSocket connection that records every server frame, in order, as a map.

    Every frame is also checked to parse as a server frame (`parse_server`):
    a malformed one is recorded in `malformed`.
    """

    def __init__(self, ws: ClientConnection, *, reading: bool = True) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.parsed: list[ServerFrame] = []
        self.malformed: list[Any] = []
        self._used: set[int] = set()
        self._changed = asyncio.Event()
        self.closed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        if reading:
            self.start_reading()

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        reading: bool = True,
        max_queue: int | tuple[int | None, int | None] | None = 16,
        rcvbuf: int | None = None,
        max_size: int | None = 1 << 20,
    ) -> RawConn:
        sock = None
        if rcvbuf is not None:
            host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        ws = await connect(
            url,
            subprotocols=[Subprotocol(SUBPROTOCOL)],
            compression=None,
            max_queue=max_queue,
            max_size=max_size,
            sock=sock,
            open_timeout=TIMEOUT,
        )
        return cls(ws, reading=reading)

    def start_reading(self) -> None:
        assert self._reader is None
        self._reader = asyncio.create_task(self._read())

    async def pause_reading(self) -> None:
        """Stop reading (websockets' recv is cancel-safe); frames then queue up unread."""
        assert self._reader is not None
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        self._reader = None

    async def _read(self) -> None:
        try:
            async for data in self.ws:
                m = decode_map(data)
                try:
                    self.parsed.append(parse_server(m))
                except Exception:
                    self.malformed.append(m)
                self.frames.append(m)
                self._changed.set()
        except ConnectionClosed:
            pass
        except asyncio.CancelledError:
            return  # paused, not closed
        self.closed.set()
        self._changed.set()

    async def send(self, frame: dict[str, Any] | bytes | str) -> None:
        await self.ws.send(encode_map(frame) if isinstance(frame, dict) else frame)

    async def hello(self, token: str, **extra: Any) -> dict[str, Any]:
        """Say hello; return the `welcome` (or the error) answering it."""
        await self.send({"t": "hello", "id": "h", "token": token, **extra})
        return await self.next(lambda m: m.get("id") == "h")

    async def request(self, frame: dict[str, Any], timeout: float = TIMEOUT) -> dict[str, Any]:
        """Send a frame with an `id`; return the frame answering that id."""
        rid = frame["id"]
        await self.send(frame)
        return await self.next(lambda m: m.get("id") == rid, timeout)

    async def next(self, pred: Pred, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The first frame matching `pred` not returned by `next` before (waits for it)."""
        async with asyncio.timeout(timeout):
            while True:
                for i in range(len(self.frames)):
                    if i not in self._used and pred(self.frames[i]):
                        self._used.add(i)
                        return self.frames[i]
                if self.closed.is_set():
                    raise self.ws.protocol.close_exc
                self._changed.clear()
                await self._changed.wait()

    async def wait_until(
        self, cond: Callable[[list[dict[str, Any]]], bool], timeout: float = TIMEOUT
    ) -> None:
        """Wait until `cond(frames)` holds."""
        async with asyncio.timeout(timeout):
            while not cond(self.frames):
                if self.closed.is_set():
                    raise AssertionError(f"connection closed ({self.close_code}) before condition")
                self._changed.clear()
                await self._changed.wait()

    async def wait_closed(self, timeout: float = TIMEOUT) -> int | None:
        """Wait for the connection to end; return the close code the server sent."""
        async with asyncio.timeout(timeout):
            await self.closed.wait()
            await self.ws.wait_closed()
        return self.close_code

    @property
    def close_code(self) -> int | None:
        rcvd = self.ws.protocol.close_rcvd
        return None if rcvd is None else int(rcvd.code)

    def of_type(self, t: str) -> list[dict[str, Any]]:
        return [m for m in self.frames if m.get("t") == t]

    async def close(self) -> None:
        await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


async def wait_close_code(client: ChatClient, timeout: float = TIMEOUT) -> int | None:
    """Wait until the server closes a ChatClient's connection; its close code."""
    assert client.ws is not None
    ws = client.ws
    async with asyncio.timeout(timeout):
        await ws.wait_closed()
    rcvd = ws.protocol.close_rcvd
    return None if rcvd is None else int(rcvd.code)


async def send_in_groups(raw: RawConn, to: str, n: int, group: int, timeout: float) -> None:
    """Send n messages (cmid `c0`...) to `to`, `group` at a time: each group pipelined,
    the next one sent when every `sent` of the last has come back."""
    for i in range(0, n, group):
        await asyncio.gather(
            *(
                raw.request(
                    {"t": "send", "id": j, "to": to, "cmid": f"c{j}", "body": "x"},
                    timeout=timeout,
                )
                for j in range(i, min(n, i + group))
            )
        )


async def collect(
    client: ChatClient,
    n: int,
    kind: type | tuple[type, ...] = (Msg, Receipt),
    timeout: float = TIMEOUT,
) -> list[Any]:
    """The next `n` events of the given kinds (others in between are dropped)."""
    out: list[Any] = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            ev = await client.recv()
            if isinstance(ev, kind):
                out.append(ev)
    return out


async def catch_up(client: ChatClient, timeout: float = TIMEOUT) -> list[Any]:
    """The events a fresh connection gets before `synced` (the synced frame last).

    ChatClient.connect already waited for `synced`, so every catch-up event is queued.
    """
    out: list[Any] = []
    async with asyncio.timeout(timeout):
        while True:
            ev = await client.recv()
            out.append(ev)
            if isinstance(ev, Synced):
                return out


def alg_none_token(sub: str, exp: int) -> str:
    def b64(obj: dict[str, Any]) -> str:
        raw = json.dumps(obj, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'sub': sub, 'exp': exp})}."


async def http_get(port: int, path: str, timeout: float = TIMEOUT) -> tuple[int, str]:
    """A plain HTTP/1.1 GET on 127.0.0.1: (status, body)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            req = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
            writer.write(req.encode())
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body.decode("utf-8", "replace")
