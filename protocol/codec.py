"""MessagePack codec: bytes <-> one map <-> a frame.

`decode_client(data, limits)` is what a server calls on every binary message;
`decode_server(data)` is what a client calls. Both either return a frame or
raise `FrameError` (a `ProtocolError`): no other exception escapes for any
input bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgpack

from .errors import ErrorCode, FrameError
from .frames import (
    ClientFrame,
    ConvsRequest,
    Hello,
    HistoryRequest,
    Mark,
    Ping,
    RequestId,
    Send,
    Typing,
    body_size,
    check_request_id,
)
from .limits import Limits
from .server_frames import (
    ConvInfo,
    ConvsReply,
    Error,
    HistoryReply,
    Msg,
    Ok,
    Pong,
    Receipt,
    Sent,
    ServerFrame,
    Synced,
    TypingEvent,
    Welcome,
)

__all__ = [
    "decode_client",
    "decode_map",
    "decode_server",
    "encode",
    "encode_map",
    "parse_client",
    "parse_server",
    "request_id",
]

_DEFAULT_LIMITS = Limits()


def encode_map(m: Mapping[str, Any]) -> bytes:
    """Pack one map (str as MessagePack str, bytes as bin)."""
    return msgpack.packb(m, use_bin_type=True)


def encode(frame: ClientFrame | ServerFrame) -> bytes:
    return encode_map(frame.to_wire())


def decode_map(data: bytes | bytearray | memoryview | str) -> dict[Any, Any]:
    """Unpack exactly one MessagePack map, or raise `FrameError(bad_frame)`."""
    if isinstance(data, str):
        raise FrameError(ErrorCode.BAD_FRAME, "text frames are not accepted; send binary")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception:  # every malformed input, whatever msgpack raises for it
        raise FrameError(ErrorCode.BAD_FRAME, "not a MessagePack value") from None
    if not isinstance(obj, dict):
        raise FrameError(ErrorCode.BAD_FRAME, "a frame must be one MessagePack map")
    return obj


def request_id(m: Mapping[Any, Any]) -> RequestId | None:
    """The map's `id` when it is a valid request id, else None (for error replies)."""
    rid = m.get("id")
    try:
        check_request_id(rid, False, "frame")
    except FrameError:
        return None
    return rid


def _hello(m: Mapping[Any, Any], limits: Limits) -> Hello:
    device = m.get("device")
    if device is None:  # nil means absent, as for every other optional field
        device = "default"
    return Hello(token=m.get("token"), id=m.get("id"), since=m.get("since"), device=device)  # type: ignore[arg-type]


def _send(m: Mapping[Any, Any], limits: Limits) -> Send:
    type_ = m.get("type")
    frame = Send(
        id=m.get("id"),  # type: ignore[arg-type]
        to=m.get("to"),  # type: ignore[arg-type]
        cmid=m.get("cmid"),  # type: ignore[arg-type]
        body=m.get("body"),  # type: ignore[arg-type]
        type="text" if type_ is None else type_,  # nil means absent
    )
    if body_size(frame.body) > limits.max_body:
        raise FrameError(ErrorCode.TOO_LARGE, f"body is over {limits.max_body} bytes")
    return frame


def _delivered(m: Mapping[Any, Any], limits: Limits) -> Mark:
    return Mark("delivered", m.get("conv"), m.get("upto"), m.get("id"))  # type: ignore[arg-type]


def _read(m: Mapping[Any, Any], limits: Limits) -> Mark:
    return Mark("read", m.get("conv"), m.get("upto"), m.get("id"))  # type: ignore[arg-type]


def _typing(m: Mapping[Any, Any], limits: Limits) -> Typing:
    return Typing(to=m.get("to"), on=m.get("on"), id=m.get("id"))  # type: ignore[arg-type]


def _history(m: Mapping[Any, Any], limits: Limits) -> HistoryRequest:
    return HistoryRequest(
        id=m.get("id"),  # type: ignore[arg-type]
        with_=m.get("with"),  # type: ignore[arg-type]
        before=m.get("before"),
        limit=m.get("limit"),
    )


def _convs(m: Mapping[Any, Any], limits: Limits) -> ConvsRequest:
    return ConvsRequest(id=m.get("id"), limit=m.get("limit"))  # type: ignore[arg-type]


def _ping(m: Mapping[Any, Any], limits: Limits) -> Ping:
    return Ping(id=m.get("id"))


_CLIENT_PARSERS: dict[str, Callable[[Mapping[Any, Any], Limits], ClientFrame]] = {
    "hello": _hello,
    "send": _send,
    "delivered": _delivered,
    "read": _read,
    "typing": _typing,
    "history": _history,
    "convs": _convs,
    "ping": _ping,
}


def parse_client(m: Mapping[Any, Any], limits: Limits = _DEFAULT_LIMITS) -> ClientFrame:
    """Validate a decoded map as a client frame; errors carry the frame's `id`."""
    t = m.get("t")
    rid = request_id(m)
    if type(t) is not str:
        raise FrameError(ErrorCode.BAD_REQUEST, "a frame needs a string 't'", rid)
    parser = _CLIENT_PARSERS.get(t)
    if parser is None:
        raise FrameError(ErrorCode.UNKNOWN_TYPE, "unknown frame type", rid)
    try:
        return parser(m, limits)
    except FrameError as exc:
        exc.id = rid
        raise
    except (TypeError, ValueError):  # e.g. an unhashable value where a key was expected
        raise FrameError(ErrorCode.BAD_REQUEST, "malformed fields", rid) from None


def decode_client(
    data: bytes | bytearray | memoryview | str, limits: Limits = _DEFAULT_LIMITS
) -> ClientFrame:
    return parse_client(decode_map(data), limits)


# --------------------------------------------------------------------------- server frames


def _msg(m: Mapping[Any, Any]) -> Msg:
    return Msg(
        mid=m["mid"],
        conv=m["conv"],
        seq=m["seq"],
        from_=m["from"],
        to=m["to"],
        cmid=m["cmid"],
        ts=m["ts"],
        type=m.get("type", "text"),
        body=m["body"],
        cur=m.get("cur"),
    )


def _conv_info(m: Mapping[Any, Any]) -> ConvInfo:
    return ConvInfo(
        conv=m["conv"],
        with_=m["with"],
        seq=m["seq"],
        ts=m["ts"],
        unread=m["unread"],
        delivered=m["delivered"],
        read=m["read"],
    )


_SERVER_PARSERS: dict[str, Callable[[Mapping[Any, Any]], ServerFrame]] = {
    "welcome": lambda m: Welcome(m["user"], m["device"], m["cur"], m["ts"], m.get("id")),
    "synced": lambda m: Synced(m["cur"]),
    "sent": lambda m: Sent(
        m["id"], m["cmid"], m["mid"], m["conv"], m["seq"], m["ts"], m["cur"], bool(m.get("dup"))
    ),
    "msg": _msg,
    "receipt": lambda m: Receipt(m["conv"], m["kind"], m["upto"], m["by"], m["ts"], m["cur"]),
    "typing": lambda m: TypingEvent(m["from"], bool(m["on"])),
    "history": lambda m: HistoryReply(
        m["id"],
        m["conv"],
        tuple(_msg(x) for x in m["msgs"]),
        bool(m["more"]),
        m["delivered"],
        m["read"],
    ),
    "convs": lambda m: ConvsReply(m["id"], tuple(_conv_info(c) for c in m["convs"])),
    "pong": lambda m: Pong(m["ts"], m.get("id")),
    "ok": lambda m: Ok(m["id"]),
    "error": lambda m: Error(
        _error_code(m["code"]), m.get("msg", ""), m.get("id"), m.get("retry_ms")
    ),
}


def _error_code(code: Any) -> ErrorCode:
    try:
        return ErrorCode(code)
    except ValueError:
        return ErrorCode.INTERNAL


def parse_server(m: Mapping[Any, Any]) -> ServerFrame:
    """Turn a decoded map from the server into a frame (used by clients)."""
    t = m.get("t")
    parser = _SERVER_PARSERS.get(t) if type(t) is str else None
    if parser is None:
        raise FrameError(ErrorCode.UNKNOWN_TYPE, f"unknown server frame type {t!r}")
    try:
        return parser(m)
    except (KeyError, TypeError, ValueError):
        raise FrameError(ErrorCode.BAD_FRAME, f"malformed '{t}' frame from server") from None


def decode_server(data: bytes | bytearray | memoryview | str) -> ServerFrame:
    return parse_server(decode_map(data))
