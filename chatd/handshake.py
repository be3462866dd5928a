"""What happens on a connection before `welcome`: the hello loop, with its deadline, the
token's verification, and the refusals (an error frame, then a close).

Before `hello`, every frame but `hello` is answered `unauthorized` (protocol/README.md,
clarification (l)); a malformed one counts towards the bad frames in a row like any
other (the session's parser counts them).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from websockets.frames import CloseCode

from protocol import ErrorCode, FrameError, Hello, decode_map, request_id

from .connection import ChatConnection
from .context import Context
from .errors import AuthError, ChatdError
from .handlers import error_frame
from .inbox import Inbox

log = logging.getLogger("chatd.session")

__all__ = ["Closing", "Greeted", "Handshake", "refuse"]

Parse = Callable[[bytes | str], tuple[Any, bytes | None, bool]]
"""The session's parser: (frame, None, False), or (None, the error frame answering the
message, whether it was the last bad frame in a row allowed)."""


class Closing(ChatdError):
    """Raised inside a session to close the connection with (code, reason)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


async def refuse(
    ctx: Context,
    ws: ChatConnection,
    code: ErrorCode,
    msg: str,
    rid: Any,
    close: tuple[int, str],
    retry_ms: int | None = None,
) -> NoReturn:
    """Answer a frame before `welcome` with an error, then close with `close`."""
    await ws.send(error_frame(ctx, code, msg, rid, retry_ms))
    raise Closing(*close)


@dataclass(frozen=True, slots=True)
class Greeted:
    frame: Hello
    user: str
    """The user the token names."""


class Handshake:
    __slots__ = ("conn_id", "ctx", "inbox", "parse", "well_formed", "ws")

    def __init__(
        self,
        ctx: Context,
        ws: ChatConnection,
        inbox: Inbox,
        conn_id: int,
        parse: Parse,
        well_formed: Callable[[], None],
    ) -> None:
        self.ctx = ctx
        self.ws = ws
        self.inbox = inbox
        self.conn_id = conn_id
        self.parse = parse
        self.well_formed = well_formed
        """Tells the session's parser that a message was a map (not a bad frame)."""

    async def run(self) -> Greeted:
        """The first `hello` with a good token; raises Closing otherwise."""
        try:
            async with asyncio.timeout(self.ctx.config.policy.hello_timeout):
                while True:
                    greeted = await self._hello_from(await self.inbox.next())
                    if greeted is not None:
                        return greeted
        except TimeoutError:
            raise Closing(CloseCode.POLICY_VIOLATION, "no hello in time") from None

    async def _hello_from(self, data: bytes | str) -> Greeted | None:
        """The `hello` in a message, with its user verified; None after answering
        anything else."""
        try:
            m = decode_map(data)
        except FrameError:
            m = None
        if m is not None and m.get("t") != "hello":
            self.well_formed()  # a map: not a bad frame in a row
            first = error_frame(self.ctx, ErrorCode.UNAUTHORIZED, "say hello first", request_id(m))
            await self.ws.send(first)
            return None
        frame, answer, close = self.parse(data)
        if answer is not None:
            await self.ws.send(answer)
        if close:
            raise Closing(CloseCode.POLICY_VIOLATION, "too many bad frames")
        if frame is None:
            return None
        assert isinstance(frame, Hello)
        try:
            user = self.ctx.auth.verify(frame.token)
        except AuthError as exc:
            log.info("conn %d: refused token (%s)", self.conn_id, exc)
            why = (CloseCode.POLICY_VIOLATION, "unauthorized")
            await refuse(
                self.ctx, self.ws, ErrorCode.UNAUTHORIZED, "bad or expired token", frame.id, why
            )
        return Greeted(frame, user)
