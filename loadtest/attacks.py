"""What one token can do to everyone else: each attack of the security review, run for a
few seconds beside a victim pair sending 20 msg/s, against chatd builds (source trees).

    python -m loadtest attacks --build before=/tmp/before --build after=. --duration 10

For each build and attack it reports the victim's send -> `sent` latency (p50/p99), the
`users` rows the attack added, and how many frames the attacker sent. The attacks:

- `none`: the victim alone (the baseline of the sitting);
- `duplicates`: ten connections of one token resend one stored `cmid` with a fresh random
  64-character `to`, as fast as the frame-rate limit lets them;
- `foreign_marks`: ten connections send `read` marks on conversations that are not the
  attacker's (`"0" * 32` and others);
- `convs`: ten connections loop `convs limit:500` for a user with `--convs` conversations;
- `replay`: ten connections reconnect with `since=0` in a loop, replaying a stream of
  `--replay-mb` megabytes.

The server runs with the protocol's default limits (not the bench's raised ones), on a
SQLite file seeded first by a server with raised limits.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import msgpack
from websockets.asyncio.client import ClientConnection, connect

from .ab import Build
from .servers import ServerProc, start_chatd

__all__ = ["ATTACKS", "run_attacks"]

ATTACKS = ("none", "duplicates", "foreign_marks", "convs", "replay")
_DEFAULTS = ["--send-rate", "20", "--send-burst", "100", "--max-frame-rate", "1000"]
_CONNS = 10


def _token(secret: str, user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 3600}, secret, algorithm="HS256")


def _pack(frame: dict[str, Any]) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)


def _unpack(data: str | bytes) -> dict[str, Any]:
    assert isinstance(data, bytes)
    out: dict[str, Any] = msgpack.unpackb(data)
    return out


async def _hello(url: str, secret: str, user: str, **extra: Any) -> ClientConnection:
    ws = await connect(url, max_size=None, subprotocols=["chatd.v1"])  # type: ignore[list-item]
    await ws.send(_pack({"t": "hello", "token": _token(secret, user), **extra}))
    while _unpack(await ws.recv())["t"] != "synced":
        pass
    return ws


async def _victim(url: str, secret: str, duration: float) -> list[float]:
    """alice sends bob 20 msg/s; the send -> `sent` latency of each, in ms."""
    alice = await _hello(url, secret, "victim_a")
    bob = await _hello(url, secret, "victim_b")
    lat: list[float] = []
    try:
        end = time.monotonic() + duration
        i = 0
        while time.monotonic() < end:
            t0 = time.perf_counter()
            frame = {"t": "send", "id": i, "to": "victim_b", "cmid": f"v{i}", "body": "hi"}
            await alice.send(_pack(frame))
            while True:
                f = _unpack(await alice.recv())
                if f.get("id") == i:
                    break
            lat.append((time.perf_counter() - t0) * 1000)
            i += 1
            await asyncio.sleep(max(0.0, 0.05 - (time.perf_counter() - t0)))
    finally:
        await alice.close()
        await bob.close()
    return lat


async def _flood(url: str, secret: str, make: Callable[[int], bytes], stop: asyncio.Event) -> int:
    """One attacker connection sending `make(i)` frames at 900/s (under the frame-rate
    limit), reading what comes back; it reconnects when the server closes it."""
    sent = 0
    while not stop.is_set():
        try:
            ws = await _hello(url, secret, "mallory", device=f"d{secrets.token_hex(3)}")
        except Exception:  # e.g. refused while its last connection is still closing
            await asyncio.sleep(0.1)
            continue
        reader = asyncio.create_task(_drain(ws))
        t0, n = time.monotonic(), 0
        try:
            while not stop.is_set():
                await ws.send(make(sent))
                sent += 1
                n += 1
                if n % 45 == 0:
                    await asyncio.sleep(max(0.0, t0 + n / 900 - time.monotonic()))
        except Exception:
            pass
        finally:
            reader.cancel()
            await ws.close()
    return sent


async def _drain(ws: ClientConnection) -> None:
    async for _ in ws:
        pass


async def _replays(url: str, secret: str, stop: asyncio.Event) -> int:
    n = 0
    while not stop.is_set():
        try:
            ws = await _hello(url, secret, "mallory", since=0)
        except Exception:
            await asyncio.sleep(0.1)
            continue
        await ws.close()
        n += 1
    return n


def _attack(kind: str, url: str, secret: str, stop: asyncio.Event) -> Awaitable[int]:
    def dup(i: int) -> bytes:
        to = secrets.token_hex(32)
        return _pack({"t": "send", "id": i, "to": to, "cmid": "stored", "body": "x"})

    def mark(i: int) -> bytes:
        return _pack({"t": "read", "id": i, "conv": f"{i % 64:032x}", "upto": 1})

    def convs(i: int) -> bytes:
        return _pack({"t": "convs", "id": i, "limit": 500})

    if kind == "replay":
        return _gather([_replays(url, secret, stop) for _ in range(_CONNS)])
    make = {"duplicates": dup, "foreign_marks": mark, "convs": convs}[kind]
    return _gather([_flood(url, secret, make, stop) for _ in range(_CONNS)])


async def _gather(coros: list[Awaitable[int]]) -> int:
    return sum(await asyncio.gather(*coros))


async def _seed(url: str, secret: str, convs: int, replay_mb: float) -> None:
    """mallory: one stored message `stored`, `convs` conversations, and a stream of
    `replay_mb` MB (with the bench's raised limits)."""
    ws = await _hello(url, secret, "mallory")
    frames = [_pack({"t": "send", "id": 0, "to": "peer0", "cmid": "stored", "body": "x"})]
    frames += [
        _pack({"t": "send", "id": i, "to": f"peer{i}", "cmid": f"c{i}", "body": "x"})
        for i in range(1, convs)
    ]
    body = "z" * 8192
    frames += [
        _pack({"t": "send", "id": f"r{i}", "to": "peer0", "cmid": f"r{i}", "body": body})
        for i in range(int(replay_mb * 1024 * 1024 / 8192))
    ]
    for i in range(0, len(frames), 200):
        for f in frames[i : i + 200]:
            await ws.send(f)
        got = 0
        while got < len(frames[i : i + 200]):
            if _unpack(await ws.recv())["t"] in ("sent", "error"):
                got += 1
    await ws.close()


def _users(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM users").fetchone()[0])


@dataclass(frozen=True, slots=True)
class Figures:
    build: str
    attack: str
    victim_p50_ms: float
    victim_p99_ms: float
    users_added: int
    attacker_frames: int


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(q * len(s)))], 1) if s else 0.0


async def _one(url: str, secret: str, kind: str, duration: float) -> tuple[list[float], int]:
    stop = asyncio.Event()
    attacker = asyncio.ensure_future(
        _attack(kind, url, secret, stop) if kind != "none" else asyncio.sleep(0, 0)
    )
    await asyncio.sleep(1.0)  # the attack is under way
    lat = await _victim(url, secret, duration)
    stop.set()
    return lat, int(await attacker)


def _start(db: Path, secret: str, b: Build, extra: list[str]) -> ServerProc:
    return start_chatd(db, secret, extra=[*b.extra, *extra], tree=b.tree)


def run_attacks(
    builds: list[Build], attacks: list[str], duration: float, convs: int, replay_mb: float
) -> list[Figures]:
    out: list[Figures] = []
    secret = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="chatd-attacks-") as td:
        for kind in attacks:
            for b in builds:
                db = Path(td) / f"{b.name}-{kind}.db"
                seeder = _start(db, secret, b, [])
                try:
                    asyncio.run(_seed(seeder.url, secret, convs, replay_mb))
                finally:
                    seeder.stop()
                before = _users(db)
                srv = _start(db, secret, b, _DEFAULTS)
                try:
                    lat, frames = asyncio.run(_one(srv.url, secret, kind, duration))
                finally:
                    srv.stop()
                fig = Figures(
                    b.name, kind, _pct(lat, 0.5), _pct(lat, 0.99), _users(db) - before, frames
                )
                out.append(fig)
                print(
                    f"{kind:>14} {b.name:>8}: victim send->sent p50 {fig.victim_p50_ms} ms "
                    f"p99 {fig.victim_p99_ms} ms; users rows added {fig.users_added}; "
                    f"attacker frames/replays {frames}",
                    flush=True,
                )
    return out
