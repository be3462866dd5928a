"""The open-loop replay engine.

Every trace event fires at its scheduled time whatever the server does; latency is
measured from that scheduled time (no coordinated omission). Each user is one
device with one lean connection (`wsclient.WsConn`). A worker drives a share of
the users in one event loop; `run_replay` forks `procs` workers and merges their
results; `replay_inprocess` runs one worker in the caller's loop (tests).

Per message the tester logs, without dataclasses:
- sender: (user, cmid, to, conv, seq, mid, t_sched, t_sent, dup) when `sent` arrives;
- recipient: (user, conn_no, conv, seq, from, cmid, mid, t_recv, live) for every raw `msg`;
- sender: (user, conv, is_read, upto, t) for every receipt by the other person.
The checker (`checker.py`) verifies exactly-once, order and receipts from these.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import resource
import struct
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgpack

from .wsclient import WsConn

__all__ = [
    "CONNECT",
    "DELIVERED",
    "DISCONNECT",
    "HISTORY",
    "KIND_CODES",
    "READ",
    "SEND",
    "TYPING",
    "Worker",
    "WorkerConfig",
    "raise_nofile",
]

CONNECT, DISCONNECT, SEND, DELIVERED, READ, TYPING, HISTORY = range(7)
KIND_CODES = {
    "connect": CONNECT,
    "disconnect": DISCONNECT,
    "send": SEND,
    "delivered": DELIVERED,
    "read": READ,
    "typing": TYPING,
    "history": HISTORY,
}
Ev = tuple[int, int, int, int, int]
"""(t_ns from start, user index, kind, peer index or -1, size/on/limit)."""

_T0 = struct.Struct("<q")
_PAD = bytes(16384)
_RETRY_CODES = ("rate_limited", "unavailable", "internal")
_mono = time.monotonic_ns


def raise_nofile() -> int:
    """Raise the open-files soft limit to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass(slots=True)
class WorkerConfig:
    wid: int
    users: list[str]
    """Every user of the trace (indices are global)."""
    mine: list[int]
    tokens: dict[int, str]
    urls: list[str]
    events: list[Ev]
    start_ns: int
    """time.monotonic_ns() of trace time 0 (shared by all workers)."""
    device: str = "lt"
    auto_delivered: bool = True
    drain_timeout: float = 15.0
    connect_timeout: float = 10.0
    max_connect_attempts: int = 60
    cmid_prefix: str = ""


class User:
    __slots__ = (
        "conn",
        "conn_no",
        "connecting",
        "cursor",
        "d_upto",
        "host",
        "idx",
        "last_seq",
        "max_sent",
        "name",
        "next_cmid",
        "path",
        "peer_conv",
        "pending",
        "port",
        "ready",
        "reconnecting",
        "seen",
        "synced",
        "t_conn",
        "token",
        "want",
    )

    def __init__(self, idx: int, name: str, token: str, url: str) -> None:
        parts = urlsplit(url)
        self.idx = idx
        self.name = name
        self.token = token
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = parts.path or "/ws"
        self.conn: WsConn | None = None
        self.conn_no = 0
        self.connecting = False
        self.ready = False
        self.synced = False
        self.want = False
        self.reconnecting = False
        self.t_conn = 0
        self.cursor = -1
        self.seen: set[Any] = set()
        self.pending: dict[int, tuple[int, int, int]] = {}
        """id (= cmid number) -> (to index, size, t_sched_ns), until `sent`."""
        self.next_cmid = 1
        self.last_seq: dict[Any, int] = {}
        self.peer_conv: dict[int, Any] = {}
        self.max_sent: dict[Any, int] = {}
        self.d_upto: dict[Any, int] = {}


@dataclass(slots=True)
class Logs:
    sent: list[tuple[Any, ...]] = field(default_factory=list)
    recv: list[tuple[Any, ...]] = field(default_factory=list)
    rcpt: list[tuple[Any, ...]] = field(default_factory=list)
    s_lat: array[int] = field(default_factory=lambda: array("q"))
    d_live: array[int] = field(default_factory=lambda: array("q"))
    d_catchup: array[int] = field(default_factory=lambda: array("q"))
    conn_lat: array[int] = field(default_factory=lambda: array("q"))
    reconn_lat: array[int] = field(default_factory=lambda: array("q"))
    lag: array[int] = field(default_factory=lambda: array("q"))
    errors: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


class Worker:
    def __init__(
        self, cfg: WorkerConfig, progress: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.cfg = cfg
        self.progress = progress
        self.index = {name: i for i, name in enumerate(cfg.users)}
        self.users: dict[int, User] = {}
        for i in cfg.mine:
            url = cfg.urls[i % len(cfg.urls)]
            self.users[i] = User(i, cfg.users[i], cfg.tokens[i], url)
        self.logs = Logs()
        self.fired_sends = 0
        self.stopping = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.cpu_s = 0.0
        self.wall_s = 0.0
        self.sched_done_ns = 0
        self._packb = msgpack.Packer(use_bin_type=True).pack
        self._rng = random.Random(cfg.wid)

    # ------------------------------------------------------------------ helpers

    def _err(self, code: str) -> None:
        e = self.logs.errors
        e[code] = e.get(code, 0) + 1

    def _count(self, what: str) -> None:
        c = self.logs.counts
        c[what] = c.get(what, 0) + 1

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ------------------------------------------------------------------ connections

    def connect(self, u: User, t_start: int, reconnect: bool) -> None:
        u.want = True
        if u.conn is not None or u.connecting:
            return
        u.connecting = True
        u.reconnecting = reconnect
        u.t_conn = t_start
        self._spawn(self._connect(u))

    async def _connect(self, u: User) -> None:
        loop = asyncio.get_running_loop()
        try:
            for attempt in range(self.cfg.max_connect_attempts):
                if not u.want or self.stopping:
                    return
                try:
                    async with asyncio.timeout(self.cfg.connect_timeout):
                        _, conn = await loop.create_connection(
                            lambda: WsConn(u.host, u.port, u.path, self._on_frame, self._on_lost),
                            u.host,
                            u.port,
                        )
                        await conn.opened
                except (OSError, TimeoutError, Exception) as exc:
                    self._err(
                        "connect_failed" if not isinstance(exc, TimeoutError) else "connect_timeout"
                    )
                    delay = min(2.0, 0.05 * 2**attempt) * (0.5 + self._rng.random())
                    await asyncio.sleep(delay)
                    continue
                if not u.want or self.stopping:
                    conn.close()
                    return
                conn.user = u  # type: ignore[attr-defined]
                u.conn = conn
                u.conn_no += 1
                hello: dict[str, Any] = {
                    "t": "hello",
                    "id": 0,
                    "token": u.token,
                    "device": self.cfg.device,
                }
                if u.cursor >= 0:
                    hello["since"] = u.cursor
                conn.send(self._packb(hello))
                return
            self._err("connect_gave_up")
        finally:
            u.connecting = False

    def disconnect(self, u: User) -> None:
        u.want = False
        u.ready = False
        if u.conn is not None:
            u.conn.close()
            u.conn = None

    def _on_lost(self, conn: WsConn) -> None:
        u: User | None = getattr(conn, "user", None)
        if u is None or u.conn is not conn:
            return
        u.conn = None
        u.ready = False
        if u.want and not self.stopping:
            self._err("conn_lost")
            self.connect(u, _mono(), True)

    # ------------------------------------------------------------------ frames in

    def _on_frame(self, conn: WsConn, data: bytes) -> None:
        now = _mono()
        u: User = conn.user  # type: ignore[attr-defined]
        try:
            m = msgpack.unpackb(data, raw=False, strict_map_key=False)
            t = m["t"]
        except Exception:
            self._err("bad_server_frame")
            return
        if t == "msg":
            self._on_msg(u, conn, m, now)
        elif t == "receipt":
            cur = m.get("cur")
            if cur is not None and cur > u.cursor:
                u.cursor = cur
            if m["by"] != u.name:
                conv = m["conv"]
                upto = m["upto"]
                self.logs.rcpt.append((u.idx, conv, m["kind"] == "read", upto, now))
                if upto > u.d_upto.get(conv, 0):
                    u.d_upto[conv] = upto
        elif t == "sent":
            self._on_sent(u, m, now)
        elif t == "welcome":
            u.ready = True
            u.synced = False
            if not u.reconnecting:
                self.logs.conn_lat.append(now - u.t_conn)
            for rid, (to, size, t_sched) in list(u.pending.items()):
                self._write_send(u, rid, to, size, t_sched)
        elif t == "synced":
            cur = m.get("cur")
            if cur is not None and cur > u.cursor:
                u.cursor = cur
            u.synced = True
            if u.conn_no > 1 and self.cfg.auto_delivered and u.conn is not None:
                # a `delivered` written just before a crash may not have been stored: mark
                # again after a resume, as a careful client does (watermarks only move forward)
                for conv, seq in u.last_seq.items():
                    u.conn.send(self._packb({"t": "delivered", "conv": conv, "upto": seq}))
            if u.reconnecting:
                self.logs.reconn_lat.append(now - u.t_conn)
        elif t == "error":
            self._on_error(u, m)
        else:
            self._count("recv_" + str(t))

    def _on_msg(self, u: User, conn: WsConn, m: dict[Any, Any], now: int) -> None:
        cur = m.get("cur")
        if cur is not None and cur > u.cursor:
            u.cursor = cur
        frm = m["from"]
        if frm == u.name:
            return  # our own message, replayed to this device after `since`
        conv = m["conv"]
        seq = m["seq"]
        fidx = self.index.get(frm, -1)
        mid = m["mid"]
        live = u.synced
        self.logs.recv.append((u.idx, u.conn_no, conv, seq, fidx, m["cmid"], mid, now))
        body = m["body"]
        if type(body) is bytes and len(body) >= 8:
            lat = now - _T0.unpack_from(body)[0]
            (self.logs.d_live if live else self.logs.d_catchup).append(lat)
        seen = u.seen
        if mid in seen:
            self._count("dup_dropped")
            return
        seen.add(mid)
        u.peer_conv[fidx] = conv
        if seq > u.last_seq.get(conv, 0):
            u.last_seq[conv] = seq
        if self.cfg.auto_delivered:
            conn.send(self._packb({"t": "delivered", "conv": conv, "upto": seq}))

    def _on_sent(self, u: User, m: dict[Any, Any], now: int) -> None:
        rid = m.get("id")
        p = u.pending.pop(rid, None)  # type: ignore[arg-type]
        cur = m.get("cur")
        if cur is not None and cur > u.cursor:
            u.cursor = cur
        if p is None:
            self._count("sent_unexpected")
            return
        to, _size, t_sched = p
        conv = m["conv"]
        seq = m["seq"]
        dup = bool(m.get("dup"))
        self.logs.sent.append((u.idx, m["cmid"], to, conv, seq, m["mid"], t_sched, now, dup))
        self.logs.s_lat.append(now - t_sched)
        if seq > u.max_sent.get(conv, 0):
            u.max_sent[conv] = seq

    def _on_error(self, u: User, m: dict[Any, Any]) -> None:
        code = str(m.get("code"))
        self._err(code)
        rid = m.get("id")
        if type(rid) is int and rid in u.pending:
            if code in _RETRY_CODES:
                delay = (m.get("retry_ms") or 200) / 1000.0
                asyncio.get_running_loop().call_later(delay, self._retry, u, rid)
            else:
                u.pending.pop(rid, None)
                self._err("send_rejected")

    def _retry(self, u: User, rid: int) -> None:
        p = u.pending.get(rid)
        if p is not None and u.ready:
            self._write_send(u, rid, *p)

    # ------------------------------------------------------------------ frames out

    def _write_send(self, u: User, rid: int, to: int, size: int, t_sched: int) -> None:
        conn = u.conn
        if conn is None or not u.ready:
            return
        if size < 8:
            size = 8
        body = _T0.pack(t_sched) + _PAD[: size - 8]
        conn.send(
            self._packb(
                {
                    "t": "send",
                    "id": rid,
                    "to": self.cfg.users[to],
                    "cmid": f"{self.cfg.cmid_prefix}{rid}",
                    "body": body,
                }
            )
        )

    def fire(self, ev: Ev, due: int) -> None:
        _, ui, kind, peer, val = ev
        u = self.users[ui]
        if kind == SEND:
            self.fired_sends += 1
            rid = u.next_cmid
            u.next_cmid += 1
            u.pending[rid] = (peer, val, due)
            self._write_send(u, rid, peer, val, due)
        elif kind == CONNECT:
            self.connect(u, due, u.conn_no > 0)
        elif kind == DISCONNECT:
            self.disconnect(u)
        elif kind in (READ, DELIVERED):
            conv = u.peer_conv.get(peer)
            if conv is None or u.conn is None or not u.ready:
                self._count("mark_skipped")
                return
            u.conn.send(
                self._packb(
                    {
                        "t": "read" if kind == READ else "delivered",
                        "conv": conv,
                        "upto": u.last_seq.get(conv, 0),
                    }
                )
            )
        elif kind == TYPING:
            if u.conn is not None and u.ready:
                u.conn.send(
                    self._packb({"t": "typing", "to": self.cfg.users[peer], "on": bool(val)})
                )
        elif kind == HISTORY and u.conn is not None and u.ready:
            u.conn.send(
                self._packb(
                    {
                        "t": "history",
                        "id": "h",
                        "with": self.cfg.users[peer],
                        "limit": val or 50,
                    }
                )
            )

    # ------------------------------------------------------------------ the run

    async def _schedule(self) -> None:
        evs = self.cfg.events
        n = len(evs)
        base = self.cfg.start_ns
        lag = self.logs.lag
        i = 0
        while i < n:
            burst = 0
            while i < n and burst < 512:
                now = _mono()
                due = base + evs[i][0]
                if due > now + 300_000:
                    break
                lag.append(now - due if now > due else 0)
                self.fire(evs[i], due)
                i += 1
                burst += 1
            if i < n:
                delay = (base + evs[i][0] - _mono()) / 1e9
                await asyncio.sleep(delay if delay > 0 else 0)

    def quiescent(self) -> bool:
        for u in self.users.values():
            if u.pending or not u.ready:
                return False
            d = u.d_upto
            for conv, seq in u.max_sent.items():
                if d.get(conv, 0) < seq:
                    return False
        return True

    async def _ticker(self) -> None:
        if self.progress is None:
            return
        last = 0
        while True:
            await asyncio.sleep(0.5)
            arr = self.logs.d_live
            window = sorted(arr[last:])
            last = len(arr)
            p99 = window[min(len(window) - 1, int(len(window) * 0.99))] / 1e6 if window else 0.0
            lagw = self.logs.lag
            self.progress(
                {
                    "wid": self.cfg.wid,
                    "fired": self.fired_sends,
                    "acked": len(self.logs.sent),
                    "received": len(self.logs.recv),
                    "errors": sum(self.logs.errors.values()),
                    "p99_ms": p99,
                    "lag_ms": (lagw[-1] / 1e6) if lagw else 0.0,
                    "online": sum(1 for u in self.users.values() if u.ready),
                }
            )

    async def run(
        self, stop: Callable[[], bool] | None = None, on_quiescent: Callable[[], None] | None = None
    ) -> dict[str, Any]:
        """Replay, drain until quiescent (or the drain timeout), then wait for `stop()`."""
        cpu0 = time.process_time()
        wall0 = time.monotonic()
        ticker = asyncio.ensure_future(self._ticker())
        try:
            await self._schedule()
            self.sched_done_ns = _mono()
            now = _mono()
            for u in self.users.values():  # final sync: everyone comes back online
                if not u.want:
                    self.connect(u, now, u.conn_no > 0)
            deadline = time.monotonic() + self.cfg.drain_timeout
            while time.monotonic() < deadline and not self.quiescent():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            if not self.quiescent():
                self._err("drain_timeout")
            if on_quiescent is not None:
                on_quiescent()
            if stop is not None:
                deadline = time.monotonic() + self.cfg.drain_timeout + 30
                while not stop() and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            self.cpu_s = time.process_time() - cpu0
            self.wall_s = time.monotonic() - wall0
        finally:
            self.stopping = True
            ticker.cancel()
            for task in list(self.tasks):
                task.cancel()
            for u in self.users.values():
                if u.conn is not None:
                    u.conn.close()
                    u.conn = None
            await asyncio.sleep(0)
        return self.result()

    def result(self) -> dict[str, Any]:
        from .hist import encode_ns

        lg = self.logs
        unacked = [
            (u.idx, f"{self.cfg.cmid_prefix}{rid}", to, t)
            for u in self.users.values()
            for rid, (to, _s, t) in u.pending.items()
        ]
        return {
            "wid": self.cfg.wid,
            "pid": os.getpid(),
            "cpu_s": self.cpu_s,
            "wall_s": self.wall_s,
            "fired_sends": self.fired_sends,
            "sent": lg.sent,
            "recv": lg.recv,
            "rcpt": lg.rcpt,
            "unacked": unacked,
            "s_lat": lg.s_lat.tobytes(),
            "d_live": lg.d_live.tobytes(),
            "d_catchup": lg.d_catchup.tobytes(),
            "conn_lat": lg.conn_lat.tobytes(),
            "reconn_lat": lg.reconn_lat.tobytes(),
            "lag": lg.lag.tobytes(),
            "errors": lg.errors,
            "counts": lg.counts,
            "hists": {
                "send_sent": encode_ns(lg.s_lat),
                "delivery_live": encode_ns(lg.d_live),
                "delivery_catchup": encode_ns(lg.d_catchup),
                "connect_welcome": encode_ns(lg.conn_lat),
                "reconnect_synced": encode_ns(lg.reconn_lat),
                "schedule_lag": encode_ns(lg.lag),
            },
        }


def to_events(trace_events: Sequence[Any], index: dict[str, int], speed: float = 1.0) -> list[Ev]:
    """TraceEvents -> engine tuples (times divided by `speed`)."""
    out: list[Ev] = []
    for e in trace_events:
        peer = index[e.peer] if e.peer is not None else -1
        out.append((int(e.t / speed * 1e9), index[e.user], KIND_CODES[e.kind], peer, e.size))
    return out
