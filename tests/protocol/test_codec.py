"""protocol/: round-trips, robustness against any input, and the validation table.

No event loop anywhere: the protocol package is pure.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol as p
from protocol import (
    ConvInfo,
    ConvsReply,
    ConvsRequest,
    Error,
    ErrorCode,
    FrameError,
    Hello,
    HistoryReply,
    HistoryRequest,
    Limits,
    Mark,
    Msg,
    Ok,
    Ping,
    Pong,
    ProtocolError,
    Receipt,
    Send,
    Sent,
    Synced,
    Typing,
    TypingEvent,
    Welcome,
    decode_client,
    decode_server,
    encode,
)

FAST = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

MIN_I64 = -(2**63)
MAX_I64 = 2**63 - 1
MAX_U64 = 2**64 - 1
USER_CHARS = string.ascii_letters + string.digits + "_.-"

CLIENT_TYPES = ["hello", "send", "delivered", "read", "typing", "history", "convs", "ping"]
SERVER_TYPES = [
    "welcome",
    "synced",
    "sent",
    "msg",
    "receipt",
    "typing",
    "history",
    "convs",
    "pong",
    "ok",
    "error",
]
FIELD_NAMES = sorted(
    {
        "id", "token", "since", "device", "to", "cmid", "body", "type", "conv", "upto", "on",
        "with", "before", "limit", "user", "cur", "ts", "mid", "seq", "dup", "from", "kind",
        "by", "msgs", "more", "delivered", "read", "convs", "unread", "code", "msg", "retry_ms",
    }
)  # fmt: skip


DEFAULT_LIMITS = Limits()


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def valid_request_id(value: object) -> bool:
    if type(value) is int:
        return MIN_I64 <= value <= MAX_I64
    return type(value) is str and len(value) <= 64


# --------------------------------------------------------------------------- strategies

user_ids = st.text(alphabet=USER_CHARS, min_size=1, max_size=64)
request_ids = st.one_of(st.integers(MIN_I64, MAX_I64), st.text(max_size=64))
opt_request_ids = st.none() | request_ids
# U+0000 is refused in strings the server may store (cmid, type, device, conv)
no_nul = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
opaques = st.one_of(
    st.integers(MIN_I64, MAX_U64), st.text(alphabet=no_nul, min_size=1, max_size=128)
)
nonneg = st.integers(0, MAX_I64)
positive = st.integers(1, MAX_I64)
short_text = st.text(alphabet=no_nul, min_size=1, max_size=64)  # cmid, device, type
str_bodies = st.text(max_size=1000)  # at most 4000 UTF-8 bytes: under the default limit
bin_bodies = st.binary(max_size=4000)
bodies = str_bodies | bin_bodies
kinds = st.sampled_from(["delivered", "read"])

hellos = st.builds(
    Hello,
    token=st.text(min_size=1, max_size=300),
    id=opt_request_ids,
    since=st.none() | nonneg,
    device=short_text,
)
sends_str = st.builds(
    Send, id=request_ids, to=user_ids, cmid=short_text, body=str_bodies, type=short_text
)
sends_bin = st.builds(
    Send, id=request_ids, to=user_ids, cmid=short_text, body=bin_bodies, type=short_text
)
marks = st.builds(Mark, kind=kinds, conv=opaques, upto=nonneg, id=opt_request_ids)
typings = st.builds(Typing, to=user_ids, on=st.booleans(), id=opt_request_ids)
history_requests = st.builds(
    HistoryRequest,
    id=request_ids,
    with_=user_ids,
    before=st.none() | nonneg,
    limit=st.none() | st.integers(1, 200),
)
convs_requests = st.builds(ConvsRequest, id=request_ids, limit=st.none() | st.integers(1, 500))
pings = st.builds(Ping, id=opt_request_ids)
client_frames = st.one_of(
    hellos, sends_str, sends_bin, marks, typings, history_requests, convs_requests, pings
)


def msgs(cur: st.SearchStrategy[int | None]) -> st.SearchStrategy[Msg]:
    return st.builds(
        Msg,
        mid=opaques,
        conv=opaques,
        seq=positive,
        from_=user_ids,
        to=user_ids,
        cmid=short_text,
        ts=nonneg,
        type=short_text,
        body=bodies,
        cur=cur,
    )


welcomes = st.builds(
    Welcome, user=user_ids, device=short_text, cur=nonneg, ts=nonneg, id=opt_request_ids
)
synceds = st.builds(Synced, cur=nonneg)
sents = st.builds(
    Sent,
    id=request_ids,
    cmid=short_text,
    mid=opaques,
    conv=opaques,
    seq=positive,
    ts=nonneg,
    cur=positive,
    dup=st.booleans(),
)
msgs_with_cur = msgs(positive)
msgs_without_cur = msgs(st.none())
receipts = st.builds(
    Receipt, conv=opaques, kind=kinds, upto=nonneg, by=user_ids, ts=nonneg, cur=positive
)
typing_events = st.builds(TypingEvent, from_=user_ids, on=st.booleans())
history_replies = st.builds(
    HistoryReply,
    id=request_ids,
    conv=opaques,
    msgs=st.lists(msgs_without_cur, max_size=4).map(tuple),
    more=st.booleans(),
    delivered=nonneg,
    read=nonneg,
)
conv_infos = st.builds(
    ConvInfo,
    conv=opaques,
    with_=user_ids,
    seq=nonneg,
    ts=nonneg,
    unread=nonneg,
    delivered=nonneg,
    read=nonneg,
)
convs_replies = st.builds(
    ConvsReply, id=request_ids, convs=st.lists(conv_infos, max_size=5).map(tuple)
)
pongs = st.builds(Pong, ts=nonneg, id=opt_request_ids)
oks = st.builds(Ok, id=request_ids)
errors = st.builds(
    Error,
    code=st.sampled_from(list(ErrorCode)),
    msg=st.text(max_size=100),
    id=opt_request_ids,
    retry_ms=st.none() | nonneg,
)

# Anything MessagePack can carry, nested.
msgpack_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(MIN_I64, MAX_U64),
    st.floats(),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12)),
    st.builds(msgpack.Timestamp, st.integers(-(2**40), 2**40), st.integers(0, 999_999_999)),
)
msgpack_keys = st.one_of(
    st.sampled_from(["t", *FIELD_NAMES]),
    st.text(max_size=8),
    st.integers(MIN_I64, MAX_U64),
    st.binary(max_size=8),
)
msgpack_values = st.recursive(
    msgpack_leaves,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(msgpack_keys, children, max_size=5)
    ),
    max_leaves=20,
)
# Values that are sometimes right for some field: they get past more validators.
plausible = st.one_of(
    user_ids,
    request_ids,
    nonneg,
    st.booleans(),
    st.sampled_from(["", "text", "x" * 65, "a b", "é"]),
    st.lists(msgs_without_cur.map(lambda m: m.to_wire()), max_size=2),
    st.lists(conv_infos.map(lambda c: c.to_wire()), max_size=2),
    st.sampled_from([str(c) for c in ErrorCode]),
    msgpack_values,
)
frame_like_maps = st.fixed_dictionaries(
    {"t": st.sampled_from(sorted({*CLIENT_TYPES, *SERVER_TYPES})) | msgpack_values},
    optional={name: plausible for name in FIELD_NAMES},
)


# --------------------------------------------------------------------------- round-trips


def assert_client_roundtrip(frame: p.ClientFrame) -> None:
    data = encode(frame)
    assert isinstance(data, bytes)
    assert decode_client(data) == frame
    assert decode_client(bytearray(data)) == frame
    assert decode_client(memoryview(data)) == frame


@FAST
@given(hellos)
def test_roundtrip_hello(frame: Hello) -> None:
    assert_client_roundtrip(frame)


@FAST
@given(sends_str)
def test_roundtrip_send_str_body(frame: Send) -> None:
    assert_client_roundtrip(frame)


@FAST
@given(sends_bin)
def test_roundtrip_send_bytes_body(frame: Send) -> None:
    assert_client_roundtrip(frame)
    decoded = decode_client(encode(frame))
    assert isinstance(decoded, Send)
    assert type(decoded.body) is bytes  # bin stays bin, never turns into str


@FAST
@given(marks)
def test_roundtrip_mark(frame: Mark) -> None:
    assert_client_roundtrip(frame)
    assert frame.t == frame.kind


@FAST
@given(typings)
def test_roundtrip_typing(frame: Typing) -> None:
    assert_client_roundtrip(frame)


@FAST
@given(history_requests)
def test_roundtrip_history_request(frame: HistoryRequest) -> None:
    assert_client_roundtrip(frame)


@FAST
@given(convs_requests)
def test_roundtrip_convs_request(frame: ConvsRequest) -> None:
    assert_client_roundtrip(frame)


@FAST
@given(pings)
def test_roundtrip_ping(frame: Ping) -> None:
    assert_client_roundtrip(frame)


def test_delivered_and_read_helpers() -> None:
    assert p.Delivered("c", 3, id=1) == Mark("delivered", "c", 3, 1)
    assert p.Read(7, 0) == Mark("read", 7, 0, None)
    assert p.Read("c", 2).to_wire() == {"t": "read", "conv": "c", "upto": 2}


SERVER_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "welcome": welcomes,
    "synced": synceds,
    "sent": sents,
    "msg_with_cur": msgs_with_cur,
    "msg_without_cur": msgs_without_cur,
    "receipt": receipts,
    "typing": typing_events,
    "history": history_replies,
    "convs": convs_replies,
    "pong": pongs,
    "ok": oks,
    "error": errors,
}


@pytest.mark.parametrize("name", sorted(SERVER_STRATEGIES))
@FAST
@given(data=st.data())
def test_roundtrip_server_frames(name: str, data: st.DataObject) -> None:
    frame = data.draw(SERVER_STRATEGIES[name])
    assert decode_server(encode(frame)) == frame


@FAST
@given(sents.filter(lambda s: s.dup))
def test_roundtrip_sent_dup(frame: Sent) -> None:
    wire = msgpack.unpackb(encode(frame))
    assert wire["dup"] is True
    decoded = decode_server(encode(frame))
    assert isinstance(decoded, Sent) and decoded.dup


@FAST
@given(history_replies.filter(lambda h: len(h.msgs) > 0))
def test_roundtrip_history_with_msgs(frame: HistoryReply) -> None:
    assert decode_server(encode(frame)) == frame
    wire = msgpack.unpackb(encode(frame))
    assert all("cur" not in m for m in wire["msgs"])


def test_wire_shapes_leave_out_absent_optionals() -> None:
    assert Ping().to_wire() == {"t": "ping"}
    assert Pong(5).to_wire() == {"t": "pong", "ts": 5}
    assert Hello("tok").to_wire() == {"t": "hello", "token": "tok", "device": "default"}
    sent = Sent(1, "c", 10, "ab", 1, 2, 3)
    assert "dup" not in sent.to_wire()
    assert Sent(1, "c", 10, "ab", 1, 2, 3, dup=True).to_wire()["dup"] is True
    msg = Msg(10, "ab", 1, "alice", "bob", "c", 2, "text", "hi")
    assert "cur" not in msg.to_wire()
    assert msg.to_wire()["from"] == "alice"
    assert Welcome("alice", "default", 0, 1).to_wire() == {
        "t": "welcome",
        "user": "alice",
        "device": "default",
        "cur": 0,
        "ts": 1,
    }
    err = Error(ErrorCode.RATE_LIMITED, "slow down", 4, retry_ms=250).to_wire()
    assert err == {"t": "error", "code": "rate_limited", "msg": "slow down", "id": 4,
                   "retry_ms": 250}  # fmt: skip
    assert type(err["code"]) is str
    hist = HistoryRequest(1, "bob").to_wire()
    assert hist == {"t": "history", "id": 1, "with": "bob"}
    assert ConvInfo("c", "bob", 1, 2, 3, 4, 5).to_wire()["with"] == "bob"


def test_constants_and_error_hierarchy() -> None:
    assert p.SUBPROTOCOL == "chatd.v1"
    assert p.PROTOCOL_VERSION == 1
    assert issubclass(FrameError, ProtocolError)
    exc = FrameError(ErrorCode.RATE_LIMITED, "wait", id="r1", retry_ms=100)
    assert Error.from_exc(exc) == Error(ErrorCode.RATE_LIMITED, "wait", "r1", 100)
    assert {str(c) for c in ErrorCode} == {
        "bad_frame",
        "bad_request",
        "unknown_type",
        "unauthorized",
        "too_large",
        "rate_limited",
        "unavailable",
        "internal",
    }


# --------------------------------------------------------------------------- any input


CLIENT_ERROR_CODES = {
    ErrorCode.BAD_FRAME,
    ErrorCode.BAD_REQUEST,
    ErrorCode.UNKNOWN_TYPE,
    ErrorCode.TOO_LARGE,
}


def decode_or_frame_error(
    decode: Callable[[bytes], object], data: bytes
) -> tuple[object | None, FrameError | None]:
    """Decode, allowing only `FrameError`: anything else fails the test."""
    try:
        return decode(data), None
    except FrameError as exc:
        assert exc.code in ErrorCode
        assert isinstance(exc.msg, str) and exc.msg
        return None, exc


def check_client_bytes(data: bytes, limits: Limits = DEFAULT_LIMITS) -> None:
    frame, exc = decode_or_frame_error(lambda d: decode_client(d, limits), data)
    if exc is not None:
        assert exc.code in CLIENT_ERROR_CODES
        assert exc.id is None or valid_request_id(exc.id)
    else:
        # Whatever decodes is a valid frame: it re-encodes to itself.
        assert decode_client(encode(frame), limits) == frame  # type: ignore[arg-type]


def check_server_bytes(data: bytes) -> None:
    frame, _ = decode_or_frame_error(decode_server, data)
    if frame is not None:
        assert type(frame).__name__ in {
            "Welcome", "Synced", "Sent", "Msg", "Receipt", "TypingEvent", "HistoryReply",
            "ConvsReply", "Pong", "Ok", "Error",
        }  # fmt: skip


@FAST
@given(st.binary(max_size=200))
def test_any_bytes_decode_client_or_frame_error(data: bytes) -> None:
    check_client_bytes(data)


@FAST
@given(st.binary(max_size=200))
def test_any_bytes_decode_server_or_frame_error(data: bytes) -> None:
    check_server_bytes(data)


@FAST
@given(msgpack_values)
def test_any_msgpack_value_decodes_or_frame_error(value: Any) -> None:
    data = pack(value)
    check_client_bytes(data)
    check_server_bytes(data)
    if not isinstance(value, dict):
        with pytest.raises(FrameError) as info:
            decode_client(data)
        assert info.value.code == ErrorCode.BAD_FRAME


@FAST
@given(frame_like_maps, st.integers(0, 64))
def test_frame_like_maps_decode_or_frame_error(m: dict[Any, Any], max_body: int) -> None:
    data = pack(m)
    check_client_bytes(data)
    check_client_bytes(data, Limits(max_body=max_body))
    check_server_bytes(data)
    _, exc = decode_or_frame_error(decode_client, data)
    if exc is not None and valid_request_id(m.get("id")):
        # A valid id is always echoed, whatever else is wrong with the frame.
        assert exc.id == m["id"] and type(exc.id) is type(m["id"])


@FAST
@given(client_frames, st.data())
def test_mutated_client_frames_echo_valid_id(frame: p.ClientFrame, data: st.DataObject) -> None:
    wire = frame.to_wire()
    key = data.draw(st.sampled_from(sorted(wire)), label="key")
    wire[key] = data.draw(plausible, label="value")
    raw = pack(wire)
    check_client_bytes(raw)
    _, exc = decode_or_frame_error(decode_client, raw)
    if exc is not None and valid_request_id(wire.get("id")):
        assert exc.id == wire["id"]


@FAST
@given(st.one_of(client_frames, welcomes, sents, msgs_with_cur, history_replies), st.data())
def test_truncated_or_extended_frames(frame: Any, data: st.DataObject) -> None:
    raw = encode(frame)
    cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
    for broken in (raw[:cut], raw + data.draw(st.binary(min_size=1, max_size=8))):
        check_client_bytes(broken)
        check_server_bytes(broken)
        with pytest.raises(FrameError) as info:
            decode_client(broken)
        assert info.value.code == ErrorCode.BAD_FRAME
        assert info.value.id is None


# --------------------------------------------------------------------------- validation table

MISSING = object()

VALID: dict[str, dict[str, Any]] = {
    "hello": {"t": "hello", "id": 1, "token": "tok", "since": 0, "device": "phone"},
    "send": {"t": "send", "id": 1, "to": "bob", "cmid": "c1", "body": "hi", "type": "text"},
    "delivered": {"t": "delivered", "id": 1, "conv": "0123abcd", "upto": 3},
    "read": {"t": "read", "id": 1, "conv": "0123abcd", "upto": 3},
    "typing": {"t": "typing", "id": 1, "to": "bob", "on": True},
    "history": {"t": "history", "id": 1, "with": "bob", "before": 10, "limit": 50},
    "convs": {"t": "convs", "id": 1, "limit": 100},
    "ping": {"t": "ping", "id": 1},
}

BAD_USER_IDS: list[Any] = [
    MISSING, None, "", "a" * 65, "bo b", "bob\n", "bób", "ü", "\uff11", "bob@x", "a/b", 5, True,
    b"bob", ["bob"],
]  # fmt: skip
BAD_NONNEG: list[Any] = [-1, "1", 1.0, True, False, None, 2**63, [1], b"1"]
BAD_SHORT_TEXT: list[Any] = ["", "x" * 65, 5, True, b"x", ["x"], {"x": 1}, "a\x00b", "\x00"]
BAD_CONVS: list[Any] = [MISSING, None, "", "c" * 129, 1.5, True, False, [1], b"abc", {}, "c\x00"]

BAD_FIELDS: list[tuple[str, str, Any]] = [
    *[("hello", "token", v) for v in [MISSING, None, 5, b"tok", ["tok"], True]],
    *[("hello", "since", v) for v in BAD_NONNEG if v is not None],
    *[("hello", "device", v) for v in BAD_SHORT_TEXT],
    *[("send", "to", v) for v in BAD_USER_IDS],
    *[("send", "cmid", v) for v in [MISSING, None, *BAD_SHORT_TEXT]],
    *[("send", "body", v) for v in [MISSING, None, 5, 1.5, True, ["x"], {"a": 1}]],
    *[("send", "type", v) for v in BAD_SHORT_TEXT],
    *[(k, "conv", v) for k in ("delivered", "read") for v in BAD_CONVS],
    *[(k, "upto", v) for k in ("delivered", "read") for v in [MISSING, *BAD_NONNEG]],
    *[("typing", "to", v) for v in BAD_USER_IDS],
    *[("typing", "on", v) for v in [MISSING, None, 1, 0, "true", b"", []]],
    *[("history", "with", v) for v in BAD_USER_IDS],
    *[("history", "before", v) for v in BAD_NONNEG if v is not None],
    *[("history", "limit", v) for v in [0, 201, -1, True, "50", 1.5, 2**63]],
    *[("convs", "limit", v) for v in [0, 501, -1, True, "100", 1.5]],
]


def build(kind: str, **changes: Any) -> dict[str, Any]:
    """The valid `kind` frame of the table, with `changes` (MISSING deletes a key)."""
    m = dict(VALID[kind])
    for k, v in changes.items():
        if v is MISSING:
            m.pop(k, None)
        else:
            m[k] = v
    return m


def frame_error(m: Any, limits: Limits = DEFAULT_LIMITS) -> FrameError:
    with pytest.raises(FrameError) as info:
        decode_client(pack(m), limits)
    return info.value


@pytest.mark.parametrize("t", sorted(VALID))
def test_valid_table_frames_decode(t: str) -> None:
    frame = decode_client(pack(VALID[t]))
    assert frame.t == t
    assert frame.to_wire() == VALID[t]


@pytest.mark.parametrize(("t", "key", "value"), BAD_FIELDS, ids=repr)
def test_bad_field_is_bad_request_with_id(t: str, key: str, value: Any) -> None:
    exc = frame_error(build(t, **{key: value}))
    assert exc.code == ErrorCode.BAD_REQUEST
    assert exc.id == 1
    assert Error.from_exc(exc).to_wire()["id"] == 1


BAD_IDS: list[Any] = [1.5, True, False, b"x", "x" * 65, 2**63, MAX_U64, [1], {"a": 1}]


@pytest.mark.parametrize("t", sorted(VALID))
@pytest.mark.parametrize("bad_id", BAD_IDS, ids=repr)
def test_bad_id_is_bad_request_without_id(t: str, bad_id: Any) -> None:
    exc = frame_error(build(t, id=bad_id))
    assert exc.code == ErrorCode.BAD_REQUEST
    assert exc.id is None


@pytest.mark.parametrize("t", sorted(VALID))
@pytest.mark.parametrize("good_id", [0, -1, MIN_I64, MAX_I64, "", "r", "x" * 64, "ü" * 64])
def test_request_id_edges_accepted(t: str, good_id: Any) -> None:
    frame = decode_client(pack(build(t, id=good_id)))
    assert frame.id == good_id
    # ...and echoed on an error of that frame.
    assert frame_error(build(t, id=good_id, t="nope")).id == good_id


@pytest.mark.parametrize("t", ["send", "history", "convs"])
def test_id_required(t: str) -> None:
    for absent in (MISSING, None):
        exc = frame_error(build(t, id=absent))
        assert exc.code == ErrorCode.BAD_REQUEST
        assert exc.id is None


@pytest.mark.parametrize("t", ["hello", "delivered", "read", "typing", "ping"])
def test_id_optional(t: str) -> None:
    for absent in (MISSING, None):
        frame = decode_client(pack(build(t, id=absent)))
        assert frame.id is None
        assert "id" not in frame.to_wire()


@pytest.mark.parametrize("t_value", [MISSING, None, 5, True, b"send", ["send"], {"t": "x"}, 1.0])
def test_missing_or_non_string_t_is_bad_request(t_value: Any) -> None:
    exc = frame_error(build("send", t=t_value))
    assert exc.code == ErrorCode.BAD_REQUEST
    assert exc.id == 1
    exc = frame_error(build("ping", t=t_value, id=MISSING))
    assert exc.code == ErrorCode.BAD_REQUEST
    assert exc.id is None


@pytest.mark.parametrize(
    "t_value", ["nope", "", "SEND", "Send", " send", "welcome", "sent", "msg", "ok", "pong"]
)
def test_unknown_t_is_unknown_type_with_id(t_value: str) -> None:
    exc = frame_error(build("ping", t=t_value, id="req-9"))
    assert exc.code == ErrorCode.UNKNOWN_TYPE
    assert exc.id == "req-9"
    assert frame_error(build("ping", t=t_value, id=MISSING)).id is None
    assert frame_error(build("ping", t=t_value, id=1.5)).id is None


def test_unknown_type_wins_over_bad_fields() -> None:
    exc = frame_error({"t": "future", "id": 3, "to": 5, "body": []})
    assert exc.code == ErrorCode.UNKNOWN_TYPE and exc.id == 3


BAD_FRAMES: list[Any] = [
    pack([1, 2]),
    pack(["t", "ping"]),
    pack(1),
    pack("ping"),
    pack(b"\x80"),
    pack(None),
    pack(True),
    pack(1.5),
    b"",
    b"\xc1",  # never used in MessagePack
    b"\x81\xa1t",  # truncated map
    pack({"t": "ping"}) + b"\x00",  # trailing garbage
    pack({"t": "ping", "id": 1}) + pack({"t": "ping"}),  # two maps in one message
    b"\x81\xa1t\xa2\xff\xfe",  # str that is not UTF-8
    b"\x81\xa1t\xdd\xff\xff\xff\xff",  # array32 claiming 4 billion items
]


@pytest.mark.parametrize("data", BAD_FRAMES, ids=repr)
def test_bad_frame(data: bytes) -> None:
    with pytest.raises(FrameError) as info:
        decode_client(data)
    assert info.value.code == ErrorCode.BAD_FRAME
    assert info.value.id is None
    with pytest.raises(FrameError) as info:
        decode_server(data)
    assert info.value.code == ErrorCode.BAD_FRAME


@pytest.mark.parametrize("text", ['{"t":"ping"}', "", "\x81\xa1t\xa4ping"])
def test_text_frames_are_bad_frame(text: str) -> None:
    with pytest.raises(FrameError) as info:
        decode_client(text)
    assert info.value.code == ErrorCode.BAD_FRAME
    with pytest.raises(FrameError) as info:
        decode_server(text)
    assert info.value.code == ErrorCode.BAD_FRAME


# Default body limit: 16384 bytes; a str counts its UTF-8 bytes.
BODIES_OK: list[str | bytes] = [
    "",
    b"",
    "a" * 16384,
    b"\x00" * 16384,
    "é" * 8192,  # 2 bytes each: 16384
    "€" * 5461,  # 3 bytes each: 16383
    "😀" * 4096,  # 4 bytes each: 16384
    "a" * 16382 + "é",  # 16384
]
BODIES_TOO_LARGE: list[str | bytes] = [
    "a" * 16385,
    b"\x00" * 16385,
    "é" * 8193,  # 8193 characters, 16386 bytes
    "€" * 5462,  # 16386 bytes
    "😀" * 4097,  # 16388 bytes
    "a" * 16383 + "é",  # 16385 bytes in 16384 characters
    "😀" * 4100,  # 4100 characters only: far under 16384, yet too large
]


@pytest.mark.parametrize("body", BODIES_OK, ids=lambda b: f"{type(b).__name__}{p.body_size(b)}")
def test_body_at_limit_ok(body: str | bytes) -> None:
    frame = decode_client(pack(build("send", body=body)))
    assert isinstance(frame, Send) and frame.body == body


@pytest.mark.parametrize(
    "body", BODIES_TOO_LARGE, ids=lambda b: f"{type(b).__name__}{p.body_size(b)}"
)
def test_body_over_limit_too_large(body: str | bytes) -> None:
    assert p.body_size(body) > 16384
    exc = frame_error(build("send", body=body, id="s-1"))
    assert exc.code == ErrorCode.TOO_LARGE
    assert exc.id == "s-1"


def test_body_size() -> None:
    assert p.body_size("") == 0
    assert p.body_size("abc") == 3
    assert p.body_size("é") == 2
    assert p.body_size("€") == 3
    assert p.body_size("😀") == 4
    assert p.body_size(b"\xff\x00") == 2


@pytest.mark.parametrize(
    ("max_body", "body", "ok"),
    [
        (10, "a" * 10, True),
        (10, "a" * 11, False),
        (10, b"b" * 10, True),
        (10, b"b" * 11, False),
        (10, "é" * 5, True),
        (10, "é" * 5 + "a", False),
        (0, "", True),
        (0, b"", True),
        (0, "a", False),
        (100_000, "a" * 50_000, True),
        (100_000, "a" * 100_001, False),
    ],
)
def test_custom_body_limit(max_body: int, body: str | bytes, ok: bool) -> None:
    limits = Limits(max_body=max_body)
    m = build("send", body=body)
    if ok:
        frame = decode_client(pack(m), limits)
        assert isinstance(frame, Send) and frame.body == body
    else:
        exc = frame_error(m, limits)
        assert exc.code == ErrorCode.TOO_LARGE and exc.id == 1


def test_default_limits_match_the_contract() -> None:
    lim = Limits()
    assert lim.max_frame == 64 * 1024
    assert lim.max_body == 16 * 1024
    assert (lim.history_default, lim.history_max) == (50, 200)
    assert (lim.convs_default, lim.convs_max) == (100, 500)


@pytest.mark.parametrize(
    ("t", "key", "value"),
    [
        ("history", "limit", 1),
        ("history", "limit", 200),
        ("history", "before", 0),
        ("history", "before", MAX_I64),
        ("convs", "limit", 1),
        ("convs", "limit", 500),
        ("hello", "since", 0),
        ("hello", "since", MAX_I64),
        ("hello", "device", "d" * 64),
        ("hello", "device", "ü"),
        ("hello", "token", "x" * 5000),
        ("send", "to", "a" * 64),
        ("send", "to", "A.b-c_9"),
        ("send", "cmid", "c" * 64),
        ("send", "cmid", "ü" * 64),
        ("send", "type", "t" * 64),
        ("send", "body", b"\x00\xff"),
        ("delivered", "conv", "c" * 128),
        ("delivered", "conv", 0),
        ("delivered", "conv", MAX_U64),
        ("delivered", "conv", -5),
        ("delivered", "upto", 0),
        ("read", "upto", MAX_I64),
        ("typing", "on", False),
        ("typing", "to", "x" * 64),
    ],
    ids=repr,
)
def test_edge_values_accepted(t: str, key: str, value: Any) -> None:
    frame = decode_client(pack(build(t, **{key: value})))
    assert frame.to_wire()[key] == value


@pytest.mark.parametrize("t", sorted(VALID))
def test_unknown_keys_ignored(t: str) -> None:
    plain = decode_client(pack(VALID[t]))
    extra: dict[Any, Any] = {
        **VALID[t],
        "x": 1,
        "future_field": {"nested": [1, 2]},
        "from": "mallory",  # a client cannot set the sender
        "user": "mallory",
        5: "int key",
        b"bin": "bin key",
    }
    assert decode_client(pack(extra)) == plain


def test_send_ignores_from() -> None:
    frame = decode_client(pack(build("send", **{"from": "mallory"})))
    assert "from" not in frame.to_wire()


def test_hello_device_defaults() -> None:
    for absent in (MISSING, None):
        frame = decode_client(pack(build("hello", device=absent)))
        assert isinstance(frame, Hello) and frame.device == "default"
    assert decode_client(pack({"t": "hello", "token": "tok"})) == Hello("tok")


def test_send_type_defaults() -> None:
    for absent in (MISSING, None):
        frame = decode_client(pack(build("send", type=absent)))
        assert isinstance(frame, Send) and frame.type == "text"


@pytest.mark.parametrize(
    ("t", "key"),
    [("hello", "since"), ("history", "before"), ("history", "limit"), ("convs", "limit")],
)
def test_nil_optional_field_means_absent(t: str, key: str) -> None:
    assert decode_client(pack(build(t, **{key: None}))) == decode_client(
        pack(build(t, **{key: MISSING}))
    )
    assert getattr(decode_client(pack(build(t, **{key: None}))), key) is None


@pytest.mark.parametrize(
    "value",
    ["", "a" * 65, "a b", " bob", "bob ", "ü", "bób", "bob\n", "b\x00b", "\uff11", "@", "a+b"],
)
def test_invalid_user_ids(value: str) -> None:
    assert not p.is_user_id(value)
    for t, key in (("send", "to"), ("typing", "to"), ("history", "with")):
        exc = frame_error(build(t, **{key: value}))
        assert exc.code == ErrorCode.BAD_REQUEST and exc.id == 1


@pytest.mark.parametrize("value", ["a", "Z", "0", "_", ".", "-", "A.b-c_9", "x" * 64, "..."])
def test_valid_user_ids(value: str) -> None:
    assert p.is_user_id(value)


@pytest.mark.parametrize("value", [None, 5, b"bob", ["bob"], True])
def test_non_string_is_not_a_user_id(value: object) -> None:
    assert not p.is_user_id(value)


@FAST
@given(st.text(max_size=70))
def test_is_user_id_matches_the_contract(value: str) -> None:
    expected = 1 <= len(value) <= 64 and all(c in USER_CHARS for c in value)
    assert p.is_user_id(value) == expected


def test_constructors_validate() -> None:
    with pytest.raises(FrameError):
        Send(None, "bob", "c", "x")  # type: ignore[arg-type]
    with pytest.raises(FrameError):
        Mark("seen", "c", 1)  # type: ignore[arg-type]
    with pytest.raises(FrameError):
        Typing("bob", 1)  # type: ignore[arg-type]
    with pytest.raises(FrameError):
        HistoryRequest(1, "bob", limit=0)
    with pytest.raises(FrameError):
        ConvsRequest(1, limit=501)
    with pytest.raises(FrameError):
        Hello(None)  # type: ignore[arg-type]
    with pytest.raises(FrameError):
        Ping(True)


# --------------------------------------------------------------------------- server decode


def test_server_unknown_type() -> None:
    for m in ({"t": "nope"}, {}, {"t": 5}, {"t": "hello", "token": "x"}):
        with pytest.raises(FrameError) as info:
            decode_server(pack(m))
        assert info.value.code == ErrorCode.UNKNOWN_TYPE


@pytest.mark.parametrize(
    "m",
    [
        {"t": "sent", "id": 1},
        {"t": "msg", "mid": 1},
        {"t": "welcome"},
        {"t": "synced"},
        {"t": "receipt", "conv": "c"},
        {"t": "typing"},
        {"t": "history", "id": 1, "conv": "c", "msgs": 5, "more": False, "delivered": 0,
         "read": 0},
        {"t": "history", "id": 1, "conv": "c", "msgs": [5], "more": False, "delivered": 0,
         "read": 0},
        {"t": "history", "id": 1, "conv": "c", "msgs": ["ab"], "more": False, "delivered": 0,
         "read": 0},
        {"t": "convs", "id": 1, "convs": [{"conv": "c"}]},
        {"t": "convs", "id": 1, "convs": None},
        {"t": "pong"},
        {"t": "ok"},
        {"t": "error", "msg": "x"},
    ],
    ids=repr,
)  # fmt: skip
def test_server_malformed_is_bad_frame(m: dict[str, Any]) -> None:
    with pytest.raises(FrameError) as info:
        decode_server(pack(m))
    assert info.value.code == ErrorCode.BAD_FRAME


def test_server_unknown_error_code_is_internal() -> None:
    frame = decode_server(pack({"t": "error", "code": "brand_new", "msg": "?"}))
    assert frame == Error(ErrorCode.INTERNAL, "?")
    frame = decode_server(pack({"t": "error", "code": ["x"], "msg": "?"}))
    assert frame == Error(ErrorCode.INTERNAL, "?")


def test_server_frames_ignore_unknown_keys() -> None:
    frame = Pong(5, 1)
    assert decode_server(pack({**frame.to_wire(), "future": [1]})) == frame
