"""Errors of the wire protocol: one root exception, one code table."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ErrorCode", "FrameError", "ProtocolError"]


class ErrorCode(StrEnum):
    """The `code` of an `error` frame (see protocol/README.md, "Errors")."""

    BAD_FRAME = "bad_frame"
    BAD_REQUEST = "bad_request"
    UNKNOWN_TYPE = "unknown_type"
    UNAUTHORIZED = "unauthorized"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """Root of every error raised by the `protocol` package."""


class FrameError(ProtocolError):
    """A frame the peer sent is wrong; it maps to exactly one `error` frame.

    `msg` is ours and safe to send to the peer: it never contains exception text
    from lower layers. `id` is the request id of the offending frame when that id
    itself was valid, so the error can be correlated by the client.
    """

    __slots__ = ("code", "id", "msg", "retry_ms")

    def __init__(
        self,
        code: ErrorCode,
        msg: str,
        id: int | str | None = None,
        retry_ms: int | None = None,
    ) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg
        self.id = id
        self.retry_ms = retry_ms
