"""A Python client for chatd.v1: connect, send with retries, receive events, resume.

    async with await ChatClient.connect("ws://127.0.0.1:8765/ws", token) as c:
        sent = await c.send("bob", "hi")          # returns once stored (the S)
        event = await c.recv()                    # msg / receipt / typing ...
        if isinstance(event, Msg):
            await c.read(event.conv, event.seq)   # the R (implies D)

The client keeps `cursor`, the highest `cur` the application has processed
(events advance it when `recv()` returns them). Store it; pass it back as
`since` (or call `reconnect()`) and the server replays exactly what was missed.
Messages are deduplicated by `mid`, so a replay of your own message that you
first saw as `sent` is not handed to you again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections import OrderedDict
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from protocol import (
    SUBPROTOCOL,
    ClientFrame,
    ConvsReply,
    ConvsRequest,
    Error,
    ErrorCode,
    Hello,
    HistoryReply,
    HistoryRequest,
    Mark,
    Msg,
    Ok,
    Ping,
    Pong,
    Receipt,
    RequestId,
    Send,
    Sent,
    ServerFrame,
    Synced,
    Typing,
    Welcome,
    decode_server,
    encode,
)
from protocol.errors import ProtocolError

__all__ = ["ChatClient", "ClientError", "RequestError"]

T = TypeVar("T")
_RETRYABLE = {ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL, ErrorCode.RATE_LIMITED}
_SEEN_MIDS = 10_000


class ClientError(Exception):
    """Root of the client's errors."""


class RequestError(ClientError):
    """The server answered a request with an `error` frame."""

    def __init__(self, error: Error) -> None:
        super().__init__(f"{error.code}: {error.msg}")
        self.error = error
        self.code = error.code
        self.retry_ms = error.retry_ms


class ChatClient:
    def __init__(
        self,
        url: str,
        token: str,
        *,
        device: str = "default",
        since: int | None = None,
        request_timeout: float = 10.0,
        max_size: int | None = 4 << 20,
    ) -> None:
        self.url = url
        self.token = token
        self.device = device
        self.cursor = since if since is not None else -1
        """Highest `cur` processed; -1 until the first `synced` (a new device)."""
        self.request_timeout = request_timeout
        self.max_size = max_size
        self.welcome: Welcome | None = None
        self.ws: ClientConnection | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[RequestId, asyncio.Future[ServerFrame]] = {}
        self._events: asyncio.Queue[ServerFrame | None] = asyncio.Queue()
        self._synced = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._seen: OrderedDict[Any, None] = OrderedDict()
        self._generation = 0
        """Counts opened connections, so concurrent retries reconnect only once."""
        self._reconnecting = asyncio.Lock()

    # ------------------------------------------------------------------ connection

    @classmethod
    async def connect(
        cls, url: str, token: str, *, wait_synced: bool = True, **kwargs: Any
    ) -> ChatClient:
        client = cls(url, token, **kwargs)
        await client.open(wait_synced=wait_synced)
        return client

    async def open(self, wait_synced: bool = True) -> Welcome:
        """Connect, say hello with the current cursor, and (by default) wait for `synced`."""
        self.ws = await connect(
            self.url,
            subprotocols=[Subprotocol(SUBPROTOCOL)],
            max_size=self.max_size,
            compression=None,
            open_timeout=self.request_timeout,
        )
        self._synced.clear()
        self._forget_close_marker()
        self._generation += 1
        self._reader = asyncio.create_task(self._read_loop(self.ws))
        since = self.cursor if self.cursor >= 0 else None
        reply = await self.request(Hello(token=self.token, since=since, device=self.device))
        if not isinstance(reply, Welcome):
            raise ClientError(f"unexpected reply to hello: {reply!r}")
        self.welcome = reply
        if wait_synced:
            await self.wait_synced()
        return reply

    async def wait_synced(self, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout or self.request_timeout * 6):
            await self._synced.wait()

    async def reconnect(self) -> Welcome:
        """Close (if open) and connect again, resuming after `cursor`."""
        await self._drop()
        return await self.open()

    async def _reconnect_once(self, generation: int) -> None:
        """Reconnect after a failure seen on connection `generation`, unless a concurrent
        retry already did (many sends in flight share one new connection)."""
        async with self._reconnecting:
            if self._generation == generation:
                await self.reconnect()

    async def close(self) -> None:
        await self._drop()

    async def _drop(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self.ws = None
        self._reader = None

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def close_code(self) -> int | None:
        return None if self.ws is None else self.ws.close_code

    # ------------------------------------------------------------------ requests

    def next_id(self) -> int:
        return next(self._ids)

    async def request(self, frame: ClientFrame, timeout: float | None = None) -> ServerFrame:
        """Send a frame that has (or is given) an `id`; return its reply or raise RequestError."""
        rid = getattr(frame, "id", None)
        if rid is None:
            import dataclasses

            rid = self.next_id()
            frame = dataclasses.replace(frame, id=rid)
        fut: asyncio.Future[ServerFrame] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            await self.send_raw(encode(frame))
            async with asyncio.timeout(timeout or self.request_timeout):
                reply = await fut
        finally:
            self._waiting.pop(rid, None)
        if isinstance(reply, Error):
            raise RequestError(reply)
        return reply

    async def send_raw(self, data: bytes | str) -> None:
        if self.ws is None:
            raise ClientError("not connected")
        await self.ws.send(data)

    async def send(
        self,
        to: str,
        body: str | bytes,
        *,
        cmid: str | None = None,
        type: str = "text",
        retries: int = 5,
    ) -> Sent:
        """Send until the server says it is stored; retries reuse the same `cmid`."""
        cmid = cmid or uuid.uuid4().hex
        delay = 0.1
        for attempt in range(retries + 1):
            last = attempt == retries
            generation = self._generation
            try:
                reply = await self.request(
                    Send(id=self.next_id(), to=to, cmid=cmid, body=body, type=type)
                )
            except RequestError as exc:
                if last or exc.code not in _RETRYABLE:
                    raise
                wait = (exc.retry_ms or 0) / 1000 if exc.retry_ms else delay
                await asyncio.sleep(wait)
                delay = min(delay * 2, 5.0)
                continue
            except (ConnectionClosed, TimeoutError, OSError, ClientError):
                if last:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                with contextlib.suppress(ConnectionClosed, TimeoutError, OSError, ClientError):
                    await self._reconnect_once(generation)
                continue
            assert isinstance(reply, Sent)
            self._remember(reply.mid)
            return reply
        raise AssertionError("unreachable")

    async def delivered(self, conv: Any, upto: int) -> None:
        await self.request(Mark("delivered", conv, upto, self.next_id()))

    async def read(self, conv: Any, upto: int) -> None:
        await self.request(Mark("read", conv, upto, self.next_id()))

    async def typing(self, to: str, on: bool = True) -> None:
        await self.send_raw(encode(Typing(to=to, on=on)))

    async def history(
        self, with_: str, before: int | None = None, limit: int | None = None
    ) -> HistoryReply:
        reply = await self.request(HistoryRequest(self.next_id(), with_, before, limit))
        assert isinstance(reply, HistoryReply)
        return reply

    async def convs(self, limit: int | None = None) -> ConvsReply:
        reply = await self.request(ConvsRequest(self.next_id(), limit))
        assert isinstance(reply, ConvsReply)
        return reply

    async def ping(self) -> Pong:
        reply = await self.request(Ping(self.next_id()))
        assert isinstance(reply, Pong)
        return reply

    # ------------------------------------------------------------------ events

    async def recv(self, timeout: float | None = None) -> ServerFrame:
        """The next event (msg, receipt, typing, synced, error without id).

        Advances `cursor`. Raises ConnectionClosed when the connection ends with no
        event left, TimeoutError after `timeout` seconds.
        """
        async with asyncio.timeout(timeout):
            while True:
                frame = await self._events.get()
                if frame is None:
                    self._events.put_nowait(None)  # stay closed for later calls
                    raise ConnectionClosed(None, None)
                cur = getattr(frame, "cur", None)
                if isinstance(frame, Synced):
                    # Adopted even when lower than our `since`: the server's stream was
                    # reset (a restore from backup); keeping the old cursor would drop
                    # every new event up to it.
                    self.cursor = frame.cur
                elif (
                    isinstance(frame, Msg | Receipt | Sent)
                    and cur is not None
                    and cur > self.cursor
                ):
                    self.cursor = cur
                if isinstance(frame, Sent):
                    continue  # already returned by send(); here only for the cursor
                if isinstance(frame, Msg):
                    if frame.mid in self._seen:
                        continue
                    self._remember(frame.mid)
                return frame

    async def recv_type(self, kind: type[T], timeout: float | None = None) -> T:
        """The next event of one type; events of other types in between are dropped."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv()
                if isinstance(frame, kind):
                    return frame

    def _forget_close_marker(self) -> None:
        """Drop the end-of-connection marker of an earlier connection, keep its events."""
        kept = []
        while not self._events.empty():
            item = self._events.get_nowait()
            if item is not None:
                kept.append(item)
        for item in kept:
            self._events.put_nowait(item)

    def pending_events(self) -> int:
        return self._events.qsize()

    def _remember(self, mid: Any) -> None:
        self._seen[mid] = None
        if len(self._seen) > _SEEN_MIDS:
            self._seen.popitem(last=False)

    async def _read_loop(self, ws: ClientConnection) -> None:
        try:
            async for data in ws:
                try:
                    frame = decode_server(data)
                except ProtocolError:
                    continue
                rid = getattr(frame, "id", None)
                fut = self._waiting.get(rid) if rid is not None else None
                if fut is not None and not fut.done():
                    fut.set_result(frame)
                    if isinstance(frame, Sent) and not frame.dup:
                        self._events.put_nowait(frame)  # keeps its place for the cursor
                    continue
                if isinstance(frame, Synced):
                    self._synced.set()
                if isinstance(frame, Ok | Pong):
                    continue
                self._events.put_nowait(frame)
        except ConnectionClosed:
            pass
        finally:
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(
                        ConnectionClosed(ws.protocol.close_rcvd, ws.protocol.close_sent)
                    )
            self._events.put_nowait(None)
