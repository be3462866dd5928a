"""Server frames of chatd.v1 (what the server sends), each shaped in exactly one place.

For every server frame there is one `*_map` function that builds its MessagePack
map, key order included. The frame class's `to_wire()` calls it (clients, tests),
and the server calls it directly on its hot path (no dataclass per frame): both
produce the same bytes because there is only one definition of each shape.
Optional keys that are absent (None) are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ErrorCode, FrameError
from .frames import Body, MarkKind, Opaque, RequestId, put

__all__ = [
    "ConvInfo",
    "ConvsReply",
    "Error",
    "HistoryReply",
    "Msg",
    "Ok",
    "Pong",
    "Receipt",
    "Sent",
    "ServerFrame",
    "Synced",
    "TypingEvent",
    "Welcome",
    "conv_info_map",
    "convs_map",
    "error_map",
    "history_map",
    "msg_map",
    "ok_map",
    "pong_map",
    "receipt_map",
    "sent_map",
    "synced_map",
    "typing_map",
    "welcome_map",
]

Map = dict[str, Any]

# --------------------------------------------------------------------------- shapes


def welcome_map(user: str, device: str, cur: int, ts: int, id: RequestId | None = None) -> Map:
    out: Map = {"t": "welcome", "user": user, "device": device, "cur": cur, "ts": ts}
    put(out, "id", id)
    return out


def synced_map(cur: int) -> Map:
    return {"t": "synced", "cur": cur}


def sent_map(
    id: RequestId,
    cmid: str,
    mid: Opaque,
    conv: Opaque,
    seq: int,
    ts: int,
    cur: int,
    dup: bool = False,
) -> Map:
    out: Map = {
        "t": "sent",
        "id": id,
        "cmid": cmid,
        "mid": mid,
        "conv": conv,
        "seq": seq,
        "ts": ts,
        "cur": cur,
    }
    if dup:
        out["dup"] = True
    return out


def msg_map(
    mid: Opaque,
    conv: Opaque,
    seq: int,
    from_: str,
    to: str,
    cmid: str,
    ts: int,
    type: str,
    body: Body,
    cur: int | None = None,
) -> Map:
    out: Map = {
        "t": "msg",
        "mid": mid,
        "conv": conv,
        "seq": seq,
        "from": from_,
        "to": to,
        "cmid": cmid,
        "ts": ts,
        "type": type,
        "body": body,
    }
    put(out, "cur", cur)
    return out


def receipt_map(conv: Opaque, kind: str, upto: int, by: str, ts: int, cur: int) -> Map:
    return {
        "t": "receipt",
        "conv": conv,
        "kind": kind,
        "upto": upto,
        "by": by,
        "ts": ts,
        "cur": cur,
    }


def typing_map(from_: str, on: bool) -> Map:
    return {"t": "typing", "from": from_, "on": on}


def history_map(
    id: RequestId, conv: Opaque, msgs: list[Map], more: bool, delivered: int, read: int
) -> Map:
    """`msgs`: `msg_map`s without `cur`, newest first."""
    return {
        "t": "history",
        "id": id,
        "conv": conv,
        "msgs": msgs,
        "more": more,
        "delivered": delivered,
        "read": read,
    }


def conv_info_map(
    conv: Opaque, with_: str, seq: int, ts: int, unread: int, delivered: int, read: int
) -> Map:
    return {
        "conv": conv,
        "with": with_,
        "seq": seq,
        "ts": ts,
        "unread": unread,
        "delivered": delivered,
        "read": read,
    }


def convs_map(id: RequestId, convs: list[Map]) -> Map:
    """`convs`: `conv_info_map`s, newest first."""
    return {"t": "convs", "id": id, "convs": convs}


def pong_map(ts: int, id: RequestId | None = None) -> Map:
    out: Map = {"t": "pong", "ts": ts}
    put(out, "id", id)
    return out


def ok_map(id: RequestId) -> Map:
    return {"t": "ok", "id": id}


def error_map(
    code: ErrorCode, msg: str, id: RequestId | None = None, retry_ms: int | None = None
) -> Map:
    out: Map = {"t": "error", "code": str(code), "msg": msg}
    put(out, "id", id)
    put(out, "retry_ms", retry_ms)
    return out


# --------------------------------------------------------------------------- classes


@dataclass(frozen=True, slots=True)
class Welcome:
    t: ClassVar[str] = "welcome"
    user: str
    device: str
    cur: int
    ts: int
    id: RequestId | None = None

    def to_wire(self) -> Map:
        return welcome_map(self.user, self.device, self.cur, self.ts, self.id)


@dataclass(frozen=True, slots=True)
class Synced:
    t: ClassVar[str] = "synced"
    cur: int

    def to_wire(self) -> Map:
        return synced_map(self.cur)


@dataclass(frozen=True, slots=True)
class Sent:
    t: ClassVar[str] = "sent"
    id: RequestId
    cmid: str
    mid: Opaque
    conv: Opaque
    seq: int
    ts: int
    cur: int
    dup: bool = False

    def to_wire(self) -> Map:
        return sent_map(
            self.id, self.cmid, self.mid, self.conv, self.seq, self.ts, self.cur, self.dup
        )


@dataclass(frozen=True, slots=True)
class Msg:
    t: ClassVar[str] = "msg"
    mid: Opaque
    conv: Opaque
    seq: int
    from_: str
    to: str
    cmid: str
    ts: int
    type: str
    body: Body
    cur: int | None = None
    """Absent in `history` replies."""

    def to_wire(self) -> Map:
        return msg_map(
            self.mid,
            self.conv,
            self.seq,
            self.from_,
            self.to,
            self.cmid,
            self.ts,
            self.type,
            self.body,
            self.cur,
        )


@dataclass(frozen=True, slots=True)
class Receipt:
    t: ClassVar[str] = "receipt"
    conv: Opaque
    kind: MarkKind
    upto: int
    by: str
    ts: int
    cur: int

    def to_wire(self) -> Map:
        return receipt_map(self.conv, self.kind, self.upto, self.by, self.ts, self.cur)


@dataclass(frozen=True, slots=True)
class TypingEvent:
    t: ClassVar[str] = "typing"
    from_: str
    on: bool

    def to_wire(self) -> Map:
        return typing_map(self.from_, self.on)


@dataclass(frozen=True, slots=True)
class HistoryReply:
    t: ClassVar[str] = "history"
    id: RequestId
    conv: Opaque
    msgs: tuple[Msg, ...]
    more: bool
    delivered: int
    read: int

    def to_wire(self) -> Map:
        msgs = [m.to_wire() for m in self.msgs]
        return history_map(self.id, self.conv, msgs, self.more, self.delivered, self.read)


@dataclass(frozen=True, slots=True)
class ConvInfo:
    conv: Opaque
    with_: str
    seq: int
    ts: int
    unread: int
    delivered: int
    read: int

    def to_wire(self) -> Map:
        return conv_info_map(
            self.conv, self.with_, self.seq, self.ts, self.unread, self.delivered, self.read
        )


@dataclass(frozen=True, slots=True)
class ConvsReply:
    t: ClassVar[str] = "convs"
    id: RequestId
    convs: tuple[ConvInfo, ...] = field(default=())

    def to_wire(self) -> Map:
        return convs_map(self.id, [c.to_wire() for c in self.convs])


@dataclass(frozen=True, slots=True)
class Pong:
    t: ClassVar[str] = "pong"
    ts: int
    id: RequestId | None = None

    def to_wire(self) -> Map:
        return pong_map(self.ts, self.id)


@dataclass(frozen=True, slots=True)
class Ok:
    t: ClassVar[str] = "ok"
    id: RequestId

    def to_wire(self) -> Map:
        return ok_map(self.id)


@dataclass(frozen=True, slots=True)
class Error:
    t: ClassVar[str] = "error"
    code: ErrorCode
    msg: str
    id: RequestId | None = None
    retry_ms: int | None = None

    @classmethod
    def from_exc(cls, exc: FrameError) -> Error:
        return cls(exc.code, exc.msg, exc.id, exc.retry_ms)

    def to_wire(self) -> Map:
        return error_map(self.code, self.msg, self.id, self.retry_ms)


ServerFrame = (
    Welcome
    | Synced
    | Sent
    | Msg
    | Receipt
    | TypingEvent
    | HistoryReply
    | ConvsReply
    | Pong
    | Ok
    | Error
)
