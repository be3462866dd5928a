"""Client frames of chatd.v1 (what a client sends): immutable, slotted, validated in
their constructors; and the value rules both directions share.

Server frames live in `server_frames` as separate classes, even where they share
a `t` with a client frame (`typing`, `history`, `convs`): the direction decides
the shape. `to_wire()` gives the MessagePack map for a frame, leaving out
optional keys that are absent.

Whose fault an error is: a constructor raises `FrameError` with code
`bad_request` (or `too_large`) when the *sender of the frame* got it wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from .errors import ErrorCode, FrameError

__all__ = [
    "PROTOCOL_VERSION",
    "SUBPROTOCOL",
    "Body",
    "ClientFrame",
    "ConvsRequest",
    "Delivered",
    "Hello",
    "HistoryRequest",
    "Mark",
    "MarkKind",
    "Opaque",
    "Ping",
    "Read",
    "RequestId",
    "Send",
    "Typing",
    "body_size",
    "is_user_id",
    "put",
]

PROTOCOL_VERSION = 1
SUBPROTOCOL = "chatd.v1"

RequestId = int | str
Opaque = int | str
Body = str | bytes
MarkKind = Literal["delivered", "read"]

_USER_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
MAX_ID_CHARS = 64
MAX_OPAQUE_CHARS = 128
MAX_INT = 2**63 - 1


def is_user_id(value: object) -> bool:
    """True for 1 to 64 characters of A-Za-z0-9_.- (and nothing else)."""
    return type(value) is str and _USER_RE.fullmatch(value) is not None


def body_size(body: Body) -> int:
    """Size of a body in bytes: the UTF-8 length of a str, the length of bytes."""
    return len(body.encode("utf-8")) if isinstance(body, str) else len(body)


def _bad(msg: str) -> FrameError:
    return FrameError(ErrorCode.BAD_REQUEST, msg)


def check_request_id(value: object, required: bool, t: str) -> None:
    if value is None:
        if required:
            raise _bad(f"'{t}' needs an 'id'")
        return
    if type(value) is int:
        if not -MAX_INT - 1 <= value <= MAX_INT:
            raise _bad("'id' out of range")
        return
    if type(value) is str and len(value) <= MAX_ID_CHARS:
        return
    raise _bad("'id' must be an int or a string of at most 64 characters")


def _user(value: object, name: str) -> None:
    if not is_user_id(value):
        raise _bad(f"'{name}' must be a user id: 1 to 64 characters of A-Za-z0-9_.-")


def _opaque(value: object, name: str) -> None:
    if type(value) is int:
        return
    if type(value) is str and 0 < len(value) <= MAX_OPAQUE_CHARS and "\x00" not in value:
        return
    raise _bad(f"'{name}' must be an int or a string of 1 to 128 characters, without U+0000")


def _text(value: object, name: str, lo: int = 1, hi: int = 64) -> None:
    """A string the server may store as text: U+0000 is refused (PostgreSQL text cannot
    hold it, and the rule must not depend on the backend)."""
    if type(value) is not str or not lo <= len(value) <= hi or "\x00" in value:
        raise _bad(f"'{name}' must be a string of {lo} to {hi} characters, without U+0000")


def _int(value: object, name: str, lo: int = 0, hi: int = MAX_INT) -> None:
    if type(value) is not int or not lo <= value <= hi:
        raise _bad(f"'{name}' must be an integer from {lo} to {hi}")


def _bool(value: object, name: str) -> None:
    if type(value) is not bool:
        raise _bad(f"'{name}' must be a boolean")


def put(out: dict[str, Any], key: str, value: object) -> None:
    if value is not None:
        out[key] = value


# --------------------------------------------------------------------------- client


@dataclass(frozen=True, slots=True)
class Hello:
    t: ClassVar[str] = "hello"
    token: str
    id: RequestId | None = None
    since: int | None = None
    device: str = "default"

    def __post_init__(self) -> None:
        check_request_id(self.id, False, self.t)
        # Any string is a token to verify (the empty one too: unauthorized, close 1008);
        # only a missing or non-string token is a malformed frame.
        if type(self.token) is not str:
            raise _bad("'token' must be a string")
        if self.since is not None:
            _int(self.since, "since")
        _text(self.device, "device")

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": self.t, "token": self.token, "device": self.device}
        put(out, "id", self.id)
        put(out, "since", self.since)
        return out


@dataclass(frozen=True, slots=True)
class Send:
    t: ClassVar[str] = "send"
    id: RequestId
    to: str
    cmid: str
    body: Body
    type: str = "text"

    def __post_init__(self) -> None:
        check_request_id(self.id, True, self.t)
        _user(self.to, "to")
        _text(self.cmid, "cmid")
        if not isinstance(self.body, str | bytes):
            raise _bad("'body' must be a string or binary")
        _text(self.type, "type")

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "id": self.id,
            "to": self.to,
            "cmid": self.cmid,
            "body": self.body,
            "type": self.type,
        }


@dataclass(frozen=True, slots=True)
class Mark:
    """`delivered` or `read`: this user has seen `conv` up to `seq` `upto`."""

    kind: MarkKind
    conv: Opaque
    upto: int
    id: RequestId | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("delivered", "read"):
            raise _bad("mark kind must be 'delivered' or 'read'")
        check_request_id(self.id, False, self.kind)
        _opaque(self.conv, "conv")
        _int(self.upto, "upto")

    @property
    def t(self) -> str:
        return self.kind

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": self.kind, "conv": self.conv, "upto": self.upto}
        put(out, "id", self.id)
        return out


def Delivered(conv: Opaque, upto: int, id: RequestId | None = None) -> Mark:
    return Mark("delivered", conv, upto, id)


def Read(conv: Opaque, upto: int, id: RequestId | None = None) -> Mark:
    return Mark("read", conv, upto, id)


@dataclass(frozen=True, slots=True)
class Typing:
    t: ClassVar[str] = "typing"
    to: str
    on: bool
    id: RequestId | None = None

    def __post_init__(self) -> None:
        check_request_id(self.id, False, self.t)
        _user(self.to, "to")
        _bool(self.on, "on")

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": self.t, "to": self.to, "on": self.on}
        put(out, "id", self.id)
        return out


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    t: ClassVar[str] = "history"
    id: RequestId
    with_: str
    before: int | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        check_request_id(self.id, True, self.t)
        _user(self.with_, "with")
        if self.before is not None:
            _int(self.before, "before")
        if self.limit is not None:
            _int(self.limit, "limit", 1, 200)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": self.t, "id": self.id, "with": self.with_}
        put(out, "before", self.before)
        put(out, "limit", self.limit)
        return out


@dataclass(frozen=True, slots=True)
class ConvsRequest:
    t: ClassVar[str] = "convs"
    id: RequestId
    limit: int | None = None

    def __post_init__(self) -> None:
        check_request_id(self.id, True, self.t)
        if self.limit is not None:
            _int(self.limit, "limit", 1, 500)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": self.t, "id": self.id}
        put(out, "limit", self.limit)
        return out


@dataclass(frozen=True, slots=True)
class Ping:
    t: ClassVar[str] = "ping"
    id: RequestId | None = None

    def __post_init__(self) -> None:
        check_request_id(self.id, False, self.t)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": self.t}
        put(out, "id", self.id)
        return out


ClientFrame = Hello | Send | Mark | Typing | HistoryRequest | ConvsRequest | Ping
