"""A fleet of real `chatd serve` processes for the process-level tests (tests/e2e/test_fleet.py).

- `Node`: one `chatd serve` child process on 127.0.0.1, port 0; its stderr is kept (lines in
  memory, and a log file in the test's directory) so that a test can wait for a log line.
- `Fleet`: nodes on one PostgreSQL database and one Redis (a prefix of their own), a shared
  JWT secret, round-robin URLs over the live nodes, and the devices to close at the end.
- `Device`: one user's device over a `RawConn`; it records every frame of every connection
  it had, reconnects with `since` (to the URL its `url` callable gives, e.g. the next live
  node or the balancer), and sends reliably: a send not answered is sent again with the
  same cmid after reconnecting.
- `check_stream`: the invariant every fleet test asserts per recipient device.
- `Haproxy`: Debian's haproxy in front of nodes, its config rendered from deploy/haproxy.cfg.

Only processes started here are ever signalled, by their PID. Everything waits on events
(frames, process output) with timeouts; the only sleeps are reconnect backoffs and the
interval of polling HAProxy's own status page.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import shutil
import signal
import sys
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from websockets.exceptions import ConnectionClosed, InvalidHandshake

from chatd.auth import Authenticator
from loadtest.redis_server import free_port

from .e2e.helpers import RawConn, http_get, is_t

__all__ = [
    "REPO",
    "SECRET",
    "Device",
    "Fleet",
    "Haproxy",
    "Node",
    "check_stream",
    "render_haproxy",
    "token",
]

REPO = Path(__file__).resolve().parents[1]
SECRET = "fleet-test-secret-" + "f" * 48
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
REQUEST_TIMEOUT = 5.0
CONNECT_ATTEMPTS = 60
SEND_ATTEMPTS = 20
_LISTENING = re.compile(r"chatd listening on (ws://\S+)")
_RETRYABLE = {"unavailable", "internal", "rate_limited"}

_auth = Authenticator(SECRET)


def token(user: str) -> str:
    return _auth.mint(user)


async def _backoff(attempt: int) -> None:
    """A reconnect's pause (not a synchronisation): 20 ms doubling to 320 ms."""
    await asyncio.sleep(0.02 * 2 ** min(attempt, 4))


class Node:
    """`chatd serve` as a child process that printed its URL."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.url = ""
        self.lines: list[str] = []
        """Its stderr (the log), line by line."""
        self._log_path = log_path
        self._changed = asyncio.Event()
        self._pumps: list[asyncio.Task[None]] = []

    @classmethod
    async def start(cls, name: str, argv: Sequence[str], workdir: Path) -> Node:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        node = cls(name, proc, workdir / f"{name}.log")
        assert proc.stdout is not None and proc.stderr is not None
        node._pumps.append(asyncio.create_task(node._pump_log(proc.stderr)))
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while not node.url:
                    line = (await proc.stdout.readline()).decode()
                    if not line:
                        await proc.wait()
                        raise RuntimeError(f"{name} exited {proc.returncode}: {node.tail()}")
                    if m := _LISTENING.search(line):
                        node.url = m.group(1)
        except BaseException:
            await node.kill()
            raise
        node._pumps.append(asyncio.create_task(_drain(proc.stdout)))
        return node

    async def _pump_log(self, stream: asyncio.StreamReader) -> None:
        with open(self._log_path, "a", encoding="utf-8") as log:  # noqa: ASYNC230
            while raw := await stream.readline():
                line = raw.decode(errors="replace")
                log.write(line)
                log.flush()
                self.lines.append(line)
                self._changed.set()
        self._changed.set()

    def tail(self, n: int = 20) -> str:
        return "".join(self.lines[-n:])

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None
        return port

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def wait_log(self, text: str, after: int = 0, timeout: float = 15.0) -> int:
        """Wait for a log line (from line `after` on) containing `text`; its index."""
        seen = after
        async with asyncio.timeout(timeout):
            while True:
                for i in range(seen, len(self.lines)):
                    if text in self.lines[i]:
                        return i
                seen = len(self.lines)
                if self.proc.returncode is not None:
                    raise AssertionError(f"{self.name} exited before logging {text!r}")
                self._changed.clear()
                await self._changed.wait()

    async def metric(self, name: str) -> float:
        """The sum of a metric's samples on /metrics (`chatd_sessions`, ...; labels such
        as a node's name, if any, are summed over)."""
        status, body = await http_get(self.port, "/metrics")
        assert status == 200, body
        found = re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", body, re.MULTILINE)
        assert found, f"{name} not in /metrics of {self.name}"
        return sum(float(v) for v in found)

    async def ready(self) -> int:
        """The status of GET /readyz."""
        return (await http_get(self.port, "/readyz"))[0]

    async def kill(self) -> None:
        """SIGKILL, by PID (only this child)."""
        if self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        await self._reap()

    async def stop(self) -> None:
        """SIGTERM and wait for a clean exit (SIGKILL if it takes too long)."""
        await terminate(self.proc)
        await self._reap()

    async def _reap(self) -> None:
        await self.proc.wait()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_TIMEOUT):
                await asyncio.gather(*self._pumps, return_exceptions=True)


async def terminate(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM our child by its PID, SIGKILL if it has not exited in STOP_TIMEOUT."""
    if proc.returncode is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await proc.wait()
        except TimeoutError:
            os.kill(proc.pid, signal.SIGKILL)
    await proc.wait()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


class Fleet:
    """Nodes on one database and one Redis prefix; devices connected to them."""

    def __init__(self, db: str, broker: str, prefix: str, workdir: Path) -> None:
        self.db = db
        self.broker = broker
        self.prefix = prefix
        self.workdir = workdir
        self.nodes: list[Node] = []
        self.devices: list[Device] = []
        self.handed: list[str] = []
        """Every URL `next_url` gave, in order."""
        self._rr = itertools.count()

    def argv(self, name: str, db: str | None = None, extra: Sequence[str] = ()) -> list[str]:
        return [
            *(sys.executable, "-m", "chatd", "serve", "--host", "127.0.0.1", "--port", "0"),
            *("--db", db or self.db, "--broker", self.broker, "--broker-prefix", self.prefix),
            *("--node-id", name, f"--jwt-secret={SECRET}", "--log-level", "INFO"),
            *("--send-rate", "1000", "--send-burst", "1000", "--shutdown-timeout", "2"),
            *("--position-interval", "0.5"),
            *extra,
        ]

    async def start(self, n: int, *extra: str, db: str | None = None) -> list[Node]:
        """Start n more nodes at once (named node1, node2, ... in start order)."""
        names = [f"node{len(self.nodes) + i + 1}" for i in range(n)]
        started = await asyncio.gather(
            *(Node.start(name, self.argv(name, db, extra), self.workdir) for name in names),
            return_exceptions=True,
        )
        for s in started:
            if isinstance(s, Node):
                self.nodes.append(s)
        for s in started:
            if isinstance(s, BaseException):
                raise s
        return self.nodes[-n:]

    @property
    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.alive]

    def next_url(self) -> str:
        """The next live node's URL, round robin: each new connection on another node."""
        live = self.live
        assert live, "no live node"
        url = live[next(self._rr) % len(live)].url
        self.handed.append(url)
        return url

    def device(
        self, user: str, device: str = "default", url: Callable[[], str] | None = None
    ) -> Device:
        d = Device(user, device, url or self.next_url)
        self.devices.append(d)
        return d

    async def close(self) -> None:
        for d in self.devices:
            with contextlib.suppress(Exception):
                await d.close()
        await asyncio.gather(*(n.stop() for n in self.nodes), return_exceptions=True)


class Device:
    """One device of one user; its frames recorded over every connection it had."""

    def __init__(self, user: str, device: str, url: Callable[[], str]) -> None:
        self.user = user
        self.device = device
        self.url = url
        self.conn: RawConn | None = None
        self.urls: list[str] = []
        """The URL of each connection it had, in order."""
        self.resends = 0
        """Sends sent again (same cmid) after a lost connection, a timeout or an error."""
        self._old: list[dict[str, Any]] = []
        self._ids = itertools.count(1)

    def __repr__(self) -> str:
        return f"{self.user}:{self.device}"

    @property
    def frames(self) -> list[dict[str, Any]]:
        return self._old + (self.conn.frames if self.conn is not None else [])

    @property
    def cursor(self) -> int:
        """The highest `cur` received (-1: none yet, a new device)."""
        best = -1
        for f in self.frames:
            if f.get("t") in ("msg", "receipt", "sent", "synced"):
                best = max(best, int(f["cur"]))
        return best

    def msgs(self, sender: str | None = None) -> list[dict[str, Any]]:
        return [
            f
            for f in self.frames
            if f.get("t") == "msg" and (sender is None or f.get("from") == sender)
        ]

    async def connect(self) -> dict[str, Any]:
        """Connect (to `url()`, retried on refusal or a node that is away), say hello with
        `since` = the cursor when there is one, wait for `synced`; the welcome."""
        for attempt in range(CONNECT_ATTEMPTS):
            url = self.url()
            try:
                raw = await RawConn.open(url)
            except (OSError, InvalidHandshake, TimeoutError):
                await _backoff(attempt)
                continue
            hello: dict[str, Any] = {"device": self.device}
            if self.cursor >= 0:
                hello["since"] = self.cursor
            try:
                welcome = await raw.hello(token(self.user), **hello)
                if welcome["t"] == "welcome":
                    await raw.next(is_t("synced"), REQUEST_TIMEOUT)
            except (ConnectionClosed, TimeoutError):
                welcome = {"t": "lost"}
            if welcome["t"] != "welcome":
                with contextlib.suppress(Exception):
                    await raw.close()
                await _backoff(attempt)
                continue
            await self._retire()
            self.conn = raw
            self.urls.append(url)
            return welcome
        raise AssertionError(f"{self} could not connect in {CONNECT_ATTEMPTS} attempts")

    async def _retire(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            with contextlib.suppress(Exception):
                await conn.close()
            self._old.extend(conn.frames)

    async def close(self) -> None:
        await self._retire()

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        """A request on the current connection (no retry)."""
        assert self.conn is not None, f"{self} is not connected"
        return await self.conn.request({**frame, "id": next(self._ids)}, REQUEST_TIMEOUT)

    async def send(self, to: str, cmid: str, body: str = "x") -> dict[str, Any]:
        """Send until `sent`: a lost connection or a timeout reconnects (with `since`), a
        retryable error waits; every attempt carries the same cmid."""
        for attempt in range(SEND_ATTEMPTS):
            self.resends += attempt > 0
            try:
                reply = await self.request({"t": "send", "to": to, "cmid": cmid, "body": body})
            except (ConnectionClosed, TimeoutError):
                await self.connect()
                continue
            if reply["t"] == "sent":
                return reply
            if reply.get("code") not in _RETRYABLE:
                raise AssertionError(f"{self}: send {cmid} refused: {reply}")
            await _backoff(attempt)
        raise AssertionError(f"{self}: {cmid} not stored after {SEND_ATTEMPTS} attempts")

    def has(self, want: Mapping[str, Sequence[str]]) -> bool:
        """Holds every message of `want` (sender -> cmids)?"""
        for sender, cmids in want.items():
            got = {m["cmid"] for m in self.msgs(sender)}
            if not got.issuperset(cmids):
                return False
        return True

    async def wait_msgs(self, want: Mapping[str, Sequence[str]], timeout: float = 15.0) -> None:
        """Wait (on this connection, without reconnecting) for every message of `want`."""
        assert self.conn is not None
        try:
            await self.conn.wait_until(lambda _frames: self.has(want), timeout)
        except TimeoutError:
            missing = {
                s: sorted(set(c) - {m["cmid"] for m in self.msgs(s)}) for s, c in want.items()
            }
            raise AssertionError(f"{self} still misses {missing}") from None


def check_stream(device: Device, want: Mapping[str, Sequence[str]]) -> None:
    """Every `msg` the device got came once, in `cur` order; from each sender of `want`
    it got exactly the acknowledged cmids, in the order they were acknowledged."""
    msgs = device.msgs()
    curs = [m["cur"] for m in msgs]
    assert curs == sorted(set(curs)), f"{device}: cur repeated or out of order: {curs}"
    keys = [(m["from"], m["cmid"]) for m in msgs]
    dups = sorted({k for k in keys if keys.count(k) > 1})
    assert not dups, f"{device}: duplicated messages {dups}"
    for sender, cmids in want.items():
        got = [m["cmid"] for m in msgs if m["from"] == sender]
        assert got == list(cmids), f"{device}: from {sender} got {got}, acknowledged {cmids}"


# ---------------------------------------------------------------------- HAProxy

HAPROXY_TEMPLATE = REPO / "deploy" / "haproxy.cfg"


def _sections(text: str) -> Iterator[tuple[str, list[str]]]:
    """The config's sections: (its header line, its lines), comments and blanks kept."""
    header, body = "", list[str]()
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            yield header, body
            header, body = line, []
        else:
            body.append(line)
    yield header, body


def render_haproxy(
    template: str, frontends: Mapping[str, int], servers: Sequence[int], maxconn: int = 1000
) -> str:
    """deploy/haproxy.cfg for this machine: each named frontend bound to 127.0.0.1 on its
    port, the backend's servers (in order) on 127.0.0.1 at `servers`, Docker's DNS
    resolver left out, the global `maxconn` lowered (HAProxy refuses to start when the
    open-file limit cannot hold twice as many). Everything else (checks, balance,
    timeouts) as the template says."""
    out: list[str] = []
    ports = iter(servers)
    for header, body in _sections(template):
        kind, _, name = header.partition(" ")
        if kind == "resolvers":
            continue
        if header:
            out.append(header)
        for line in body:
            words = line.split()
            if kind == "frontend" and words[:1] == ["bind"]:
                line = f"    bind 127.0.0.1:{frontends[name.strip()]}"
            elif words[:1] == ["server"]:
                line = f"    server {words[1]} 127.0.0.1:{next(ports)}"
            elif kind == "global" and words[:1] == ["maxconn"]:
                line = f"    maxconn {maxconn}"
            elif words[:1] == ["default-server"]:
                line = re.sub(r"\s+resolvers\s+\S+", "", line)
            out.append(line)
    left = list(ports)
    assert not left, f"the template has fewer servers than {len(servers)}"
    return "\n".join(out) + "\n"


class Haproxy:
    """Debian's haproxy, in the foreground, on a rendered config; ended by its PID."""

    def __init__(
        self, proc: asyncio.subprocess.Process, workdir: Path, port: int, stats_port: int
    ) -> None:
        self.proc = proc
        self.workdir = workdir
        self.port = port
        self.stats_port = stats_port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @staticmethod
    def executable() -> str | None:
        return shutil.which("haproxy") or next(
            (p for p in ("/usr/sbin/haproxy",) if os.access(p, os.X_OK)), None
        )

    @classmethod
    async def start(cls, workdir: Path, servers: Sequence[int]) -> Haproxy:
        exe = cls.executable()
        assert exe is not None, "haproxy is not installed (apt-get install -y haproxy)"
        port, stats_port = free_port(), free_port()
        cfg = workdir / "haproxy.cfg"
        text = render_haproxy(
            HAPROXY_TEMPLATE.read_text(), {"chat": port, "stats": stats_port}, servers
        )
        cfg.write_text(text)
        log = open(workdir / "haproxy.log", "wb")  # noqa: ASYNC230, SIM115
        with log:
            proc = await asyncio.create_subprocess_exec(
                exe, "-db", "-f", str(cfg), stdout=log, stderr=asyncio.subprocess.STDOUT
            )
        lb = cls(proc, workdir, port, stats_port)
        try:
            await lb.wait_servers({f"chatd{i + 1}": "UP" for i in range(len(servers))})
        except BaseException:
            await lb.stop()
            raise
        return lb

    async def server_status(self) -> dict[str, str]:
        """Each backend server's status from the stats page's CSV (UP, DOWN, ...)."""
        url = f"http://127.0.0.1:{self.stats_port}/stats;csv"
        body = await asyncio.to_thread(_fetch, url)  # chunked: urllib reads it whole
        lines = body.splitlines()
        cols = lines[0].lstrip("# ").split(",")
        out = {}
        for line in lines[1:]:
            row = dict(zip(cols, line.split(","), strict=False))
            if row.get("pxname") == "chatd" and row.get("svname") not in ("FRONTEND", "BACKEND"):
                out[row["svname"]] = row["status"]
        return out

    async def wait_servers(self, want: Mapping[str, str], timeout: float = 15.0) -> None:
        """Poll the status page until each named server has the wanted status."""
        last: dict[str, str] = {}
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if self.proc.returncode is not None:
                        log = (self.workdir / "haproxy.log").read_text(errors="replace")
                        raise AssertionError(f"haproxy exited {self.proc.returncode}: {log}")
                    with contextlib.suppress(OSError):
                        last = await self.server_status()
                        if all(last.get(k) == v for k, v in want.items()):
                            return
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError(f"haproxy servers {last}, wanted {dict(want)}") from None

    async def stop(self) -> None:
        await terminate(self.proc)


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT) as resp:
        return str(resp.read().decode())
