"""Every error code of the protocol's table that a client can trigger (invariant 7)."""

from __future__ import annotations

import asyncio
import time

import jwt
import msgpack
import pytest

from chatd.server import Server
from storage.base import StorageUnavailable

from .conftest import SECRET, Clients, MakeConfig, Servers
from .helpers import RawConn, alg_none_token, is_t


async def ping_ok(raw: RawConn, rid: object = "alive") -> None:
    assert (await raw.request({"t": "ping", "id": rid}))["t"] == "pong"


def err_code(frame: dict[str, object]) -> object:
    assert frame["t"] == "error", frame
    assert isinstance(frame["msg"], str)
    return frame["code"]


# ------------------------------------------------------------------ bad_frame


@pytest.mark.parametrize("hello_first", [True, False])
async def test_bad_frame_answered_and_connection_stays_open(
    srv: Server, clients: Clients, hello_first: bool
) -> None:
    raw = (await clients.raw_hello(srv, "alice")) if hello_first else await clients.raw(srv)
    bad: list[bytes | str] = [
        "a text frame",
        msgpack.packb([1, 2, 3]),
        msgpack.packb("just a string"),
        b"\xc1\xc1\xc1",
        b"",
        msgpack.packb({"t": "ping"}) + b"\x00",  # trailing bytes: not exactly one map
    ]
    for data in bad:
        await raw.send(data)
    errs = [await raw.next(is_t("error")) for _ in bad]
    assert [e["code"] for e in errs] == ["bad_frame"] * len(bad)
    assert all("id" not in e for e in errs)
    if hello_first:
        await ping_ok(raw)
    else:
        w = await raw.hello(srv.ctx.auth.mint("alice"))
        assert w["t"] == "welcome"


@pytest.mark.parametrize("hello_first", [True, False])
async def test_tenth_bad_frame_in_a_row_is_answered_then_closed_1008(
    srv: Server, clients: Clients, hello_first: bool
) -> None:
    raw = (await clients.raw_hello(srv, "alice")) if hello_first else await clients.raw(srv)
    # nine bad frames, then a good one: the count starts over (twice)
    for rid in (1, 2):
        for _ in range(9):
            await raw.send(b"\xc1")
        reply = await raw.request({"t": "ping", "id": rid})
        assert reply["t"] == ("pong" if hello_first else "error")
    for _ in range(10):
        await raw.send(b"\xc1")
    assert await raw.wait_closed() == 1008
    errors = raw.of_type("error")
    bad = [e for e in errors if e["code"] == "bad_frame"]
    assert len(bad) == 28  # every one answered, the 10th in a row too


async def test_max_bad_frames_configurable(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    srv = await servers.start(make_config(max_bad_frames=3))
    raw = await clients.raw_hello(srv, "alice")
    for _ in range(3):
        await raw.send("text")
    assert await raw.wait_closed() == 1008
    assert [e["code"] for e in raw.of_type("error")] == ["bad_frame"] * 3


# ------------------------------------------------------------------ bad_request, unknown_type


async def test_bad_request_cases(srv: Server, clients: Clients) -> None:
    raw = await clients.raw_hello(srv, "alice")
    cases: list[dict[str, object]] = [
        {"t": "send", "to": "bob", "cmid": "c", "body": "x"},  # send needs an id
        {"t": "send", "id": 1, "cmid": "c", "body": "x"},  # missing to
        {"t": "send", "id": 2, "to": "bob", "body": "x"},  # missing cmid
        {"t": "send", "id": 3, "to": "bob", "cmid": "c"},  # missing body
        {"t": "send", "id": 4, "to": 5, "cmid": "c", "body": "x"},  # wrong type
        {"t": "send", "id": 5, "to": "bob", "cmid": "c" * 65, "body": "x"},  # too long cmid
        {"t": "send", "id": 6, "to": "bob", "cmid": "c", "body": 7},  # wrong body type
        {"t": "send", "id": 7, "to": "alice", "cmid": "c", "body": "x"},  # to oneself
        {"t": "send", "id": 8, "to": "bob", "cmid": "c", "body": "x", "type": ""},
        {"t": "read", "id": 9, "conv": "x", "upto": "1"},
        {"t": "read", "id": 10, "conv": "x", "upto": -1},
        {"t": "delivered", "id": 11, "upto": 1},
        {"t": "typing", "id": 12, "to": "bob", "on": 1},
        # U+0000 in a string the server would store (PostgreSQL text cannot hold it)
        {"t": "send", "id": 20, "to": "bob", "cmid": "c\x00", "body": "x"},
        {"t": "send", "id": 21, "to": "bob", "cmid": "c", "body": "x", "type": "t\x00"},
        {"t": "read", "id": 22, "conv": "x\x00", "upto": 1},
        {"t": "hello", "id": 13, "token": srv.ctx.auth.mint("alice")},  # second hello
        {"t": "hello", "id": 14, "token": srv.ctx.auth.mint("mallory")},  # still no switch
        {"t": 3, "id": 15},  # t not a string
        {"id": 16},  # no t
    ]
    for frame in cases:
        err = await raw.request(frame) if "id" in frame else None
        if err is None:
            await raw.send(frame)
            err = await raw.next(is_t("error"))
        assert err_code(err) == "bad_request", frame
    # an invalid id itself: answered, without that id
    await raw.send({"t": "ping", "id": 1.5})
    e = await raw.next(is_t("error"))
    assert e["code"] == "bad_request" and "id" not in e
    await ping_ok(raw)
    assert await srv.store.last_cur("alice") == 0  # nothing stored, and still alice:
    r = await raw.request({"t": "send", "id": "ok", "to": "bob", "cmid": "c", "body": "x"})
    assert r["t"] == "sent"
    h = await raw.request({"t": "history", "id": "h", "with": "bob"})
    assert h["msgs"][0]["from"] == "alice"


async def test_unknown_type_keeps_connection_open(srv: Server, clients: Clients) -> None:
    raw = await clients.raw_hello(srv, "alice")
    err = await raw.request({"t": "subscribe", "id": 7, "x": 1})
    assert err_code(err) == "unknown_type" and err["id"] == 7
    await raw.send({"t": "nope"})
    assert err_code(await raw.next(is_t("error"))) == "unknown_type"
    await ping_ok(raw)
    assert raw.close_code is None


async def test_unknown_keys_are_ignored(srv: Server, clients: Clients) -> None:
    raw = await clients.raw_hello(srv, "alice", future_key={"a": 1})
    r = await raw.request(
        {
            "t": "send",
            "id": 1,
            "to": "bob",
            "cmid": "c",
            "body": "x",
            "priority": 9,
            "extra": [1, 2],
        }
    )
    assert r["t"] == "sent"
    assert (await raw.request({"t": "ping", "id": 2, "zzz": None}))["t"] == "pong"


# ------------------------------------------------------------------ unauthorized


async def test_frame_before_hello_is_unauthorized_and_stays_open(
    srv: Server, clients: Clients
) -> None:
    raw = await clients.raw(srv)
    for i, frame in enumerate(
        [
            {"t": "ping", "id": "p"},
            {"t": "send", "id": "s", "to": "bob", "cmid": "c", "body": "x"},
            {"t": "history", "id": "h", "with": "bob"},
        ]
    ):
        err = await raw.request(frame)
        assert err_code(err) == "unauthorized", (i, err)
    await raw.send({"t": "typing", "to": "bob", "on": True})
    assert err_code(await raw.next(is_t("error"))) == "unauthorized"
    w = await raw.hello(srv.ctx.auth.mint("alice"))
    assert w["t"] == "welcome" and w["user"] == "alice"
    await ping_ok(raw)
    assert await srv.store.last_cur("alice") == 0


def _bad_tokens(srv: Server) -> dict[str, str]:
    now = int(time.time())
    return {
        "garbage": "not.a.jwt",
        "empty": "",
        "expired": srv.ctx.auth.mint("alice", ttl=1, now=now - 3600),
        "expired 1 s ago": srv.ctx.auth.mint("alice", ttl=1, now=now - 2),  # no leeway
        "other secret": jwt.encode(
            {"sub": "alice", "exp": now + 600}, "another-" + SECRET, algorithm="HS256"
        ),
        "alg none": alg_none_token("alice", now + 600),
        "no exp": jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"),
        "no sub": jwt.encode({"exp": now + 600}, SECRET, algorithm="HS256"),
        "bad sub": jwt.encode({"sub": "al ice!", "exp": now + 600}, SECRET, algorithm="HS256"),
        "HS512": jwt.encode({"sub": "alice", "exp": now + 600}, SECRET, algorithm="HS512"),
    }


@pytest.mark.parametrize(
    "kind",
    [
        "garbage",
        "empty",
        "expired",
        "expired 1 s ago",
        "other secret",
        "alg none",
        "no exp",
        "no sub",
        "bad sub",
        "HS512",
    ],
)
async def test_bad_token_unauthorized_then_close_1008(
    srv: Server, clients: Clients, kind: str
) -> None:
    raw = await clients.raw(srv)
    err = await raw.hello(_bad_tokens(srv)[kind])
    assert err_code(err) == "unauthorized" and err["id"] == "h"
    assert await raw.wait_closed() == 1008
    assert raw.of_type("welcome") == []


async def test_non_string_token_is_bad_request(srv: Server, clients: Clients) -> None:
    raw = await clients.raw(srv)
    err = await raw.request({"t": "hello", "id": 1, "token": 123})
    assert err_code(err) == "bad_request"
    w = await raw.hello(srv.ctx.auth.mint("alice"))
    assert w["t"] == "welcome"


# ------------------------------------------------------------------ too_large


async def test_body_over_limit_is_too_large(srv: Server, clients: Clients) -> None:
    raw = await clients.raw_hello(srv, "alice")
    limit = 16 * 1024
    ok = await raw.request({"t": "send", "id": 1, "to": "bob", "cmid": "a", "body": "x" * limit})
    assert ok["t"] == "sent"
    ok = await raw.request(
        {"t": "send", "id": 2, "to": "bob", "cmid": "b", "body": b"\x00" * limit}
    )
    assert ok["t"] == "sent"
    for rid, body in (
        (3, "x" * (limit + 1)),
        (4, b"\x00" * (limit + 1)),
        (5, "é" * (limit // 2 + 1)),  # 8193 characters, 16386 UTF-8 bytes
        (6, "😀" * (limit // 4 + 1)),
    ):
        if rid >= 5:  # multibyte: few enough characters, too many UTF-8 bytes
            assert isinstance(body, str) and len(body) <= limit
        err = await raw.request(
            {"t": "send", "id": rid, "to": "bob", "cmid": f"c{rid}", "body": body}
        )
        assert err_code(err) == "too_large" and err["id"] == rid
    await ping_ok(raw)
    assert await srv.store.last_cur("bob") == 2


# ------------------------------------------------------------------ rate_limited


async def test_sends_over_burst_are_rate_limited_but_dups_answered(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    srv = await servers.start(make_config(send_burst=3, send_rate=0.5))
    raw = await clients.raw_hello(srv, "alice")
    raw2 = await clients.raw_hello(srv, "alice", device="two")  # the rate is per user
    for i in range(2):
        r = await raw.request({"t": "send", "id": i, "to": "bob", "cmid": f"c{i}", "body": "x"})
        assert r["t"] == "sent"
    r = await raw2.request({"t": "send", "id": 2, "to": "bob", "cmid": "c2", "body": "x"})
    assert r["t"] == "sent"
    err = await raw.request({"t": "send", "id": 3, "to": "bob", "cmid": "c3", "body": "x"})
    assert err_code(err) == "rate_limited"
    assert isinstance(err["retry_ms"], int) and 0 < err["retry_ms"] <= 2000
    err = await raw2.request({"t": "send", "id": 4, "to": "bob", "cmid": "c4", "body": "x"})
    assert err_code(err) == "rate_limited"
    # a resend of a stored cmid is answered as a dup even over the rate
    dup = await raw.request({"t": "send", "id": 5, "to": "bob", "cmid": "c1", "body": "x"})
    assert dup["t"] == "sent" and dup["dup"] is True and dup["seq"] == 2
    assert await srv.store.last_cur("alice") == 3
    # other requests are not limited by the send rate
    await ping_ok(raw)
    h = await raw.request({"t": "history", "id": "h", "with": "bob"})
    assert [m["cmid"] for m in h["msgs"]] == ["c2", "c1", "c0"]


async def test_refused_sends_look_up_their_cmid_one_at_a_time(
    servers: Servers, make_config: MakeConfig, clients: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send over the rate (or to oneself) reads storage to see whether it is a retry.
    A flood of them must not start a read each at once (they would starve the read
    pool for everyone): one lookup per connection at a time, the rest held in order."""
    srv = await servers.start(make_config(send_burst=1, send_rate=0.001))
    raw = await clients.raw_hello(srv, "alice")
    first = await raw.request({"t": "send", "id": 0, "to": "bob", "cmid": "c0", "body": "x"})
    assert first["t"] == "sent"
    real = srv.store.find_sent
    active = 0
    most = 0
    gate = asyncio.Event()
    started = asyncio.Event()

    async def counting(sender: str, cmid: str) -> object:
        nonlocal active, most
        active += 1
        most = max(most, active)
        started.set()
        try:
            await gate.wait()
            return await real(sender, cmid)
        finally:
            active -= 1

    monkeypatch.setattr(srv.store, "find_sent", counting)
    for i in range(1, 41):
        await raw.send({"t": "send", "id": i, "to": "bob", "cmid": f"c{i}", "body": "x"})
    await raw.send({"t": "send", "id": 41, "to": "bob", "cmid": "c0", "body": "x"})  # a retry
    await raw.send({"t": "ping", "id": "p"})
    async with asyncio.timeout(5):
        await started.wait()
    other = await clients.raw_hello(srv, "carol")  # a round trip: alice's frames are in
    await ping_ok(other)
    gate.set()
    await raw.next(is_t("pong", id="p"))
    assert most == 1
    answers = [f for f in raw.frames if f.get("id") not in (None, "h", 0, "p")]
    assert [f["id"] for f in answers] == list(range(1, 42))
    assert all(f["t"] == "error" and f["code"] == "rate_limited" for f in answers[:-1])
    assert answers[-1]["t"] == "sent" and answers[-1]["dup"] is True


async def test_connections_over_limit_rate_limited_then_close_1013(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    srv = await servers.start(make_config(max_connections_per_user=2))
    a1 = await clients.raw_hello(srv, "alice", device="1")
    await clients.raw_hello(srv, "alice", device="2")
    await clients.raw_hello(srv, "bob")  # another user is not affected
    third = await clients.raw(srv)
    err = await third.hello(srv.ctx.auth.mint("alice"))
    assert err_code(err) == "rate_limited" and err["id"] == "h"
    assert await third.wait_closed() == 1013
    await ping_ok(a1)
    # after one closes, a new one fits
    await a1.close()
    again = await clients.raw(srv)
    assert (await again.hello(srv.ctx.auth.mint("alice")))["t"] == "welcome"


async def test_default_connection_limit_is_ten(srv: Server, clients: Clients) -> None:
    for i in range(10):
        await clients.raw_hello(srv, "alice", device=f"d{i}", wait_synced=False)
    extra = await clients.raw(srv)
    assert err_code(await extra.hello(srv.ctx.auth.mint("alice"))) == "rate_limited"
    assert await extra.wait_closed() == 1013


# ------------------------------------------------------------------ unavailable, internal


async def test_storage_unavailable_nothing_stored_connection_usable(
    srv: Server, clients: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = await clients.raw_hello(srv, "alice")

    async def broken(*args: object, **kw: object) -> object:
        raise StorageUnavailable("database down")

    def failed_write(*args: object, **kw: object) -> asyncio.Future[object]:
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        fut.set_exception(StorageUnavailable("database down"))  # a failed transaction
        return fut

    with monkeypatch.context() as m:
        m.setattr(srv.store, "send", failed_write)
        err = await raw.request({"t": "send", "id": 1, "to": "bob", "cmid": "c", "body": "x"})
        assert err_code(err) == "unavailable" and err["id"] == 1
        assert "database down" not in err["msg"]
        m.setattr(srv.store, "history", broken)
        err = await raw.request({"t": "history", "id": 2, "with": "bob"})
        assert err_code(err) == "unavailable"
        await ping_ok(raw)
    assert await srv.store.last_cur("alice") == 0
    assert await srv.store.last_cur("bob") == 0
    # the client resends the same cmid later: stored once, as seq 1
    r = await raw.request({"t": "send", "id": 3, "to": "bob", "cmid": "c", "body": "x"})
    assert r["t"] == "sent" and r["seq"] == 1 and not r.get("dup")


async def test_internal_error(
    srv: Server, clients: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = await clients.raw_hello(srv, "alice")

    def boom(*args: object, **kw: object) -> object:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(srv.store, "send", boom)
    monkeypatch.setattr(srv.store, "mark", boom)
    err = await raw.request({"t": "send", "id": 1, "to": "bob", "cmid": "c", "body": "x"})
    assert err_code(err) == "internal" and "secret" not in err["msg"]
    err = await raw.request({"t": "read", "id": 2, "conv": "abc", "upto": 1})
    assert err_code(err) == "internal"
    await ping_ok(raw)
    monkeypatch.undo()
    r = await raw.request({"t": "send", "id": 3, "to": "bob", "cmid": "c", "body": "x"})
    assert r["t"] == "sent" and r["seq"] == 1
