"""Hellos per second and connections held: `chatd serve --workers 1` against `--workers 2`.

    flock /tmp/chatd-bench.lock .venv/bin/python -m loadtest.conns

Runs alternate (workers 1, 2, 1, 2, ... for `--rounds` rounds). Each run serves chatd on
a fresh PostgreSQL database (created, then dropped) with the Redis broker (a
redis-server of this run's own on a free port, or `--redis URL` with a prefix of the
run's own; nothing is flushed), and measures, with `--procs` load-generator processes:

1. hellos: `--hellos` authenticated connections opened as fast as they go, each
   generator with `--inflight` attempts at once (TCP connect to /ws, the WebSocket
   upgrade, `hello` with a token, wait for `welcome`; a failed attempt is retried):
   welcomes per second, connect->welcome p50/p99, errors by kind, the server's CPU
   (every process of the group) per 1,000 hellos, PostgreSQL's too. Then all close.
2. held: idle authenticated connections opened the same way until `--target` are held
   or a generator sees `--stall` failures in a row (the server refuses: its connection
   budget, `chatd.admission`, is its open-file limit less a reserve). Reported: the
   connections held at once (welcomed and still open when the RSS is read), the RSS of
   the server processes, KiB per connection (RSS growth since the start / held).

A generator is a process of its own (its own open-file limit, soft raised to hard) that
connects from an address of its own, 127.0.0.2, 127.0.0.3, ... (ephemeral ports are
counted per source address), always to 127.0.0.1. The generators and the server share
the machine's cores: each row gives the generators' CPU share of the machine, how busy
the machine was, and the share that none of the processes measured here used
("others": another engineer's tests; interrupts left out), and says "saturated" when a
generator process was busy >= 90% of its wall time (the generator may be the
bottleneck) or the machine was >= 95% busy (the rate is the machine's, generator
included, not the server's alone). The kernel's accept-queue overflows are counted
beside (the listen backlog is printed): connections dropped there wait for a SYN
retransmission (1 s, then 3 s, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import json
import math
import multiprocessing as mp
import os
import queue
import resource
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import psutil  # type: ignore[import-untyped,unused-ignore]

from chatd.admission import budget_for

from .ab import _round_db
from .engine import raise_nofile
from .hist import encode_ns, merge, summary
from .procstat import PostgresCpu
from .redis_server import private_redis
from .runner import new_loop
from .servers import BENCH_LIMITS, _raise_nofile
from .wsclient import HandshakeError, WsConn

__all__ = ["ConnsOptions", "GenSpec", "main", "run_conns"]

_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_LISTENING = "chatd listening on "
_GEN_SATURATED = 0.9
_MACHINE_SATURATED = 0.95
_STARTUP_S = 60.0
_PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"
_TICK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------- load generator


@dataclass(frozen=True, slots=True)
class GenSpec:
    """One generator process of one phase."""

    gid: int
    src: str
    """Local address the sockets bind to (127.0.0.2, ...)."""
    host: str
    port: int
    count: int
    """Connections to hold at most (each a user of its own)."""
    inflight: int
    stall: int
    """Failed attempts in a row that end the opening (the server refuses)."""
    open_s: float
    """Seconds the opening may take at most."""
    hold_max_s: float
    """Seconds to hold the connections at most, waiting for the parent's stop."""
    secret: str
    users: str
    """User ids are `users` + number."""
    connect_timeout: float = 10.0


class _Refused(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Marks a failed future's exception as seen (an attempt given up may fail later)."""
    if not fut.cancelled():
        fut.exception()


class _Probe(WsConn):
    """A connection that waits for its `welcome`."""

    def __init__(self, gen: _Gen, host: str, port: int) -> None:
        super().__init__(host, port, "/ws", gen.on_frame, gen.on_lost)
        self.welcome: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.held = False
        self.opened.add_done_callback(_retrieve)
        self.welcome.add_done_callback(_retrieve)


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, _Refused):
        return exc.code
    if isinstance(exc, HandshakeError):
        return "closed_in_upgrade" if "closed during" in str(exc) else "upgrade_refused"
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, f"errno_{exc.errno}")
    return type(exc).__name__


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class _Gen:
    def __init__(self, spec: GenSpec, tokens: list[str]) -> None:
        self.spec = spec
        self.hellos = [
            msgpack.packb({"t": "hello", "id": 0, "token": t, "device": "lt"}) for t in tokens
        ]
        self.todo = list(range(len(tokens) - 1, -1, -1))
        self.conns: list[_Probe] = []
        self.live = 0
        self.lost = 0
        self.attempts = 0
        self.in_row = 0
        self.errors: dict[str, int] = {}
        self.lat: list[int] = []
        self.halt = ""
        self.t_last = 0
        self.deadline = 0.0

    def on_frame(self, conn: WsConn, data: bytes) -> None:
        assert isinstance(conn, _Probe)
        if conn.welcome.done():
            return  # `synced`, pings' neighbours: an idle connection ignores them
        try:
            m = msgpack.unpackb(data)
            t = m.get("t")
        except Exception:
            t = None
        if t == "welcome":
            conn.welcome.set_result(time.monotonic_ns())
        elif t == "error":
            conn.welcome.set_exception(_Refused(f"error_{m.get('code')}"))

    def on_lost(self, conn: WsConn) -> None:
        assert isinstance(conn, _Probe)
        if not conn.welcome.done():
            conn.welcome.set_exception(_Refused("closed_before_welcome"))
        elif conn.held:
            conn.held = False
            self.live -= 1
            self.lost += 1

    async def attempt(self, i: int) -> bool:
        spec = self.spec
        loop = asyncio.get_running_loop()
        self.attempts += 1
        t0 = time.monotonic_ns()
        sock: socket.socket | None = None
        conn: _Probe | None = None
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            # the port is chosen at connect, per (source, destination): no bind() conflicts
            sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((spec.src, 0))
            async with asyncio.timeout(spec.connect_timeout):
                await loop.sock_connect(sock, (spec.host, spec.port))
                _, conn = await loop.create_connection(
                    lambda: _Probe(self, spec.host, spec.port), sock=sock
                )
                await conn.opened
                conn.send(self.hellos[i])
                t1 = await conn.welcome
        except Exception as exc:
            if conn is not None:
                conn.abort()
            elif sock is not None:
                sock.close()
            code = _why(exc)
            self.errors[code] = self.errors.get(code, 0) + 1
            return False
        conn.held = True
        self.conns.append(conn)
        self.live += 1
        self.lat.append(t1 - t0)
        self.t_last = max(self.t_last, t1)
        return True

    async def opener(self) -> None:
        spec = self.spec
        while not self.halt and self.todo:
            i = self.todo.pop()
            if await self.attempt(i):
                self.in_row = 0
            else:
                self.todo.append(i)  # the user tries again
                self.in_row += 1
                if self.in_row >= spec.stall:
                    self.halt = self.halt or "refused"
                await asyncio.sleep(0.005)
            if time.monotonic() > self.deadline:
                self.halt = self.halt or "deadline"

    async def run(
        self, report: Callable[[str, Any], None], wait_stop: Callable[[float], bool]
    ) -> dict[str, Any]:
        """Open, say "opened", hold until `wait_stop(timeout)` returns; the figures."""
        spec = self.spec
        cpu0 = _cpu_self()
        t0 = time.monotonic_ns()
        self.deadline = time.monotonic() + spec.open_s
        await asyncio.gather(*(self.opener() for _ in range(spec.inflight)))
        t_done = time.monotonic_ns()
        cpu_open = _cpu_self() - cpu0
        report("opened", self.live)
        await asyncio.to_thread(wait_stop, spec.hold_max_s)  # the loop answers pings meanwhile
        live = self.live
        for c in self.conns:
            c.abort()  # a reset: no TIME_WAIT left behind on either side
        return {
            "gid": spec.gid,
            "src": spec.src,
            "wanted": spec.count,
            "welcomed": len(self.lat),
            "live_at_stop": live,
            "lost": self.lost,
            "attempts": self.attempts,
            "errors": self.errors,
            "halt": self.halt or "done",
            "lat_hist": encode_ns(self.lat),
            "t_start_ns": t0,
            "t_done_ns": t_done,
            "t_last_welcome_ns": self.t_last,
            "cpu_open_s": cpu_open,
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        }


def _gen_main(spec: GenSpec, q: Any, go: Any, stop: Any) -> None:
    """A generator process: mint its tokens, wait for `go`, open, hold until `stop`."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
    raise_nofile()
    from chatd.auth import Authenticator

    auth = Authenticator(spec.secret)
    tokens = [auth.mint(f"{spec.users}{i}", 3600) for i in range(spec.count)]
    q.put(("ready", spec.gid, None))
    if not go.wait(_STARTUP_S * 2):
        return

    def report(kind: str, value: Any) -> None:
        q.put((kind, spec.gid, value))

    with asyncio.Runner(loop_factory=new_loop) as runner:
        res = runner.run(_Gen(spec, tokens).run(report, stop.wait))
    q.put(("result", spec.gid, res))


# ---------------------------------------------------------------------- the server


class Fleet:
    """`chatd serve --workers N` on 127.0.0.1 (N = 1: one process; more: a supervisor and
    N workers), started by us (PR_SET_PDEATHSIG) and ended by its PID."""

    def __init__(self, workers: int, args: Sequence[str]) -> None:
        self.workers = workers
        argv = [
            *(sys.executable, "-m", "chatd", "serve", "--host", "127.0.0.1", "--port", "0"),
            *("--log-level", "WARNING", "--workers", str(workers), *args),
        ]
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_raise_nofile,
            env={**os.environ, **BENCH_LIMITS},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        threading.Thread(target=self._read_out, args=(self.proc.stdout,), daemon=True).start()
        threading.Thread(target=self._read_err, args=(self.proc.stderr,), daemon=True).start()
        self.url = ""
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise
        self.port = int(self.url.rsplit(":", 1)[1].split("/", 1)[0])
        self.pids = [self.proc.pid]
        if workers > 1:
            self.pids += [c.pid for c in psutil.Process(self.proc.pid).children()]
        self.ps = [psutil.Process(pid) for pid in self.pids]

    def _read_out(self, stream: Any) -> None:
        with contextlib.suppress(Exception):
            for line in stream:
                self.lines.put(line)

    def _read_err(self, stream: Any) -> None:
        with contextlib.suppress(Exception):
            for line in stream:
                if len(self.stderr) < 2000:
                    self.stderr.append(line.rstrip("\n"))

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + _STARTUP_S
        seen = 0
        while seen < self.workers:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                time.sleep(0.2)
                tail = "\n".join(self.stderr[-20:])
                raise RuntimeError(f"chatd --workers {self.workers} did not start:\n{tail}")
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            i = line.find(_LISTENING)
            if i >= 0:
                seen += 1
                self.url = self.url or line[i + len(_LISTENING) :].split()[0]

    def cpu_s(self) -> float:
        total = 0.0
        for p in self.ps:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def alive(self) -> list[int]:
        out = []
        for p in self.ps:
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p.pid)
        return out

    def sample(self) -> dict[str, Any]:
        """RSS and open files of every process of the group, now."""
        rss: dict[str, int] = {}
        fds: dict[str, int] = {}
        for p in self.ps:
            with contextlib.suppress(psutil.Error, OSError):
                rss[str(p.pid)] = int(p.memory_info().rss)
                fds[str(p.pid)] = len(os.listdir(f"/proc/{p.pid}/fd"))
        return {
            "rss": sum(rss.values()),
            "fds": sum(fds.values()),
            "rss_by_pid": rss,
            "fds_by_pid": fds,
        }

    def nofile(self) -> int:
        """The open-file limit of the serving process (a worker's, with workers)."""
        pid = self.pids[-1]
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
                if line.startswith("Max open files"):
                    return int(line.split()[3])
        return 0

    def settle(self, timeout: float = 60.0) -> float:
        """Wait (bounded) until the group's open files stop changing and it is idle (the
        closed connections are gone); the seconds waited."""
        t0 = time.monotonic()
        fds = self.sample()["fds"]
        cpu = self.cpu_s()
        while time.monotonic() - t0 < timeout:
            time.sleep(0.5)
            fds2, cpu2 = self.sample()["fds"], self.cpu_s()
            if fds2 == fds and cpu2 - cpu < 0.05 * len(self.ps):
                break
            fds, cpu = fds2, cpu2
        return time.monotonic() - t0

    def stop(self, timeout: float = 30.0) -> list[int]:
        """SIGTERM to the group's parent (it passes it on), SIGKILL if it lingers; the PIDs
        of the group still alive afterwards (none, unless something is wrong)."""
        kids = []
        with contextlib.suppress(psutil.Error):
            kids = psutil.Process(self.proc.pid).children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        _gone, alive = psutil.wait_procs(kids, timeout=timeout)
        return [p.pid for p in alive]


@contextlib.contextmanager
def own_redis() -> Iterator[tuple[str, psutil.Process]]:
    """A redis-server of this run's own on a free port of 127.0.0.1, without persistence."""
    with (
        tempfile.TemporaryDirectory(prefix="chatd-conns-redis-") as td,
        private_redis(Path(td)) as server,
    ):
        yield server.url, psutil.Process(server.pid)


# ---------------------------------------------------------------------- phases


@dataclass(frozen=True, slots=True)
class ConnsOptions:
    workers: tuple[int, ...] = (1, 2)
    rounds: int = 2
    hellos: int = 3000
    target: int = 20_000
    procs: int = 4
    inflight: int = 16
    """Attempts in flight per generator process."""
    stall: int = 300
    hello_stall: int = 2000
    open_s: float = 300.0
    hold_s: float = 2.0
    """Seconds the connections are held before the RSS is read."""
    pg: str = _PG_DEFAULT
    """PostgreSQL admin URL: each run makes a database of its own beside it."""
    redis: str = ""
    """Redis URL of the broker ("": a redis-server of the run's own)."""
    serve_args: tuple[str, ...] = ()


def _specs(
    opt: ConnsOptions, fleet: Fleet, total: int, stall: int, secret: str, users: str
) -> list[GenSpec]:
    n = max(1, opt.procs)
    share = math.ceil(total / n)
    return [
        GenSpec(
            gid=g,
            src=f"127.0.0.{2 + g}",
            host="127.0.0.1",
            port=fleet.port,
            count=min(share, total - g * share),
            inflight=opt.inflight,
            stall=stall,
            open_s=opt.open_s,
            hold_max_s=opt.open_s + opt.hold_s + 120.0,  # the others may open longer
            secret=secret,
            users=f"{users}{g}x",
        )
        for g in range(n)
        if total - g * share > 0
    ]


def _collect(q: Any, procs: list[Any], kind: str, timeout: float) -> dict[int, Any]:
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(got) < len(procs):
        if time.monotonic() > deadline:
            raise RuntimeError(f"generators: {len(got)} of {len(procs)} said {kind!r} in time")
        try:
            k, gid, val = q.get(timeout=0.2)
        except queue.Empty:
            dead = [p.pid for p in procs if not p.is_alive() and p.exitcode]
            if dead:
                raise RuntimeError(f"generator process(es) {dead} failed") from None
            continue
        if k != kind:
            raise RuntimeError(f"generator {gid} said {k!r}, expected {kind!r}")
        got[gid] = val
    return got


def _phase(
    fleet: Fleet,
    specs: list[GenSpec],
    pg: PostgresCpu | None,
    redis: psutil.Process | None,
    hold_s: float = 0.0,
) -> dict[str, Any]:
    """Run one phase of the generators against `fleet`; its figures."""
    ctx = mp.get_context("fork")
    q: Any = ctx.Queue()
    go = ctx.Event()
    stop = ctx.Event()
    procs = [ctx.Process(target=_gen_main, args=(s, q, go, stop), daemon=True) for s in specs]
    for p in procs:
        p.start()
    try:
        _collect(q, procs, "ready", _STARTUP_S)
        machine = MachineCpu()
        if pg is not None:
            pg.start()
        redis0 = _proc_cpu(redis)
        cpu0 = fleet.cpu_s()
        drops0 = listen_overflows()
        t_go = time.monotonic_ns()
        machine.start()
        go.set()
        timeout = max(s.open_s + s.connect_timeout for s in specs) + 60.0
        _collect(q, procs, "opened", timeout)
        t_opened = time.monotonic_ns()
        server_cpu = fleet.cpu_s() - cpu0
        pg_s = None if pg is None else pg.seconds()
        redis_s = None if redis is None else _proc_cpu(redis) - redis0
        machine.stop()
        drops = listen_overflows() - drops0
        time.sleep(hold_s)
        sample = fleet.sample()
        stop.set()
        results = _collect(q, procs, "result", 60.0)
    finally:
        stop.set()
        go.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)
    res = [results[s.gid] for s in specs]
    welcomed = sum(r["welcomed"] for r in res)
    t_last = max((r["t_last_welcome_ns"] for r in res if r["welcomed"]), default=t_go)
    rate_wall = max(1e-9, (t_last - t_go) / 1e9)
    open_wall = max(1e-9, (t_opened - t_go) / 1e9)
    errors: dict[str, int] = {}
    for r in res:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    gen_cpu = sum(r["cpu_open_s"] for r in res)
    gen_busy = max(
        r["cpu_open_s"] / max(1e-9, (r["t_done_ns"] - r["t_start_ns"]) / 1e9) for r in res
    )
    lat = summary(merge(r["lat_hist"] for r in res))
    ncpu = os.cpu_count() or 1
    shares = machine.shares(server_cpu + gen_cpu + (pg_s or 0.0) + (redis_s or 0.0))
    return {
        "wanted": sum(s.count for s in specs),
        "welcomed": welcomed,
        "held": sum(r["live_at_stop"] for r in res),
        "lost": sum(r["lost"] for r in res),
        "attempts": sum(r["attempts"] for r in res),
        "errors": errors,
        "halts": sorted({r["halt"] for r in res}),
        "rate": welcomed / rate_wall,
        "wall_s": rate_wall,
        "p50_ms": lat.get("p50"),
        "p99_ms": lat.get("p99"),
        "max_ms": lat.get("max"),
        "server_cpu_s": server_cpu,
        "pg_cpu_s": pg_s,
        "redis_cpu_s": redis_s,
        "machine_busy": shares["busy"],
        "irq_share": shares["irq"],
        "others_share": shares["others"],
        "listen_drops": drops,
        "gen_cpu_s": gen_cpu,
        "gen_share": gen_cpu / (open_wall * ncpu),
        "gen_busiest": gen_busy,
        "gen_nofile": min(r["nofile"] for r in res),
        "sample": sample,
    }


def _cpu_line() -> list[int]:
    """The machine's `cpu` line of /proc/stat (every core, clock ticks): user nice system
    idle iowait irq softirq steal ..."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


class MachineCpu:
    """How the machine's time went since `start()`: busy, and of it interrupts (the
    loopback's TCP work shows as softirq) and what the processes we know of did not use
    (other processes: another engineer's tests)."""

    def __init__(self) -> None:
        self._start = self._end = _cpu_line()

    def start(self) -> None:
        self._start = _cpu_line()

    def stop(self) -> None:
        self._end = _cpu_line()

    def shares(self, known_s: float) -> dict[str, float]:
        """Shares of the machine's time between `start()` and `stop()`; `known_s`: the CPU
        seconds of the processes we account for."""
        d = [b - a for a, b in zip(self._start, self._end, strict=False)]
        total = max(1, sum(d[:8]))
        idle = d[3] + d[4]
        irq = d[5] + d[6]
        rest = (total - idle - irq) / _TICK - known_s
        return {
            "busy": (total - idle) / total,
            "irq": irq / total,
            "others": max(0.0, rest * _TICK / total),
        }


def listen_overflows() -> int:
    """The kernel's count of connections dropped or refused at a full accept queue
    (TcpExt ListenOverflows + ListenDrops, the whole machine), since boot."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        lines = Path("/proc/net/netstat").read_text().splitlines()
        for head, vals in zip(lines[::2], lines[1::2], strict=False):
            if head.startswith("TcpExt:"):
                row = dict(zip(head.split()[1:], map(int, vals.split()[1:]), strict=True))
                return row.get("ListenOverflows", 0) + row.get("ListenDrops", 0)
    return 0


def listen_backlog(port: int) -> int | None:
    """The accept-queue length a socket listening on 127.0.0.1:`port` asked for (`ss`)."""
    exe = shutil.which("ss")
    if exe is None:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError, IndexError):
        out = subprocess.run(
            [exe, "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10
        ).stdout
        return max(int(line.split()[2]) for line in out.splitlines() if line.strip())
    return None


def _proc_cpu(p: psutil.Process | None) -> float:
    if p is None:
        return 0.0
    with contextlib.suppress(psutil.Error):
        t = p.cpu_times()
        return float(t.user + t.system)
    return 0.0


def _saturated(ph: dict[str, Any]) -> str:
    why = []
    if ph["gen_busiest"] >= _GEN_SATURATED:
        why.append("generator")
    if ph["machine_busy"] >= _MACHINE_SATURATED:
        why.append("machine")
    return "+".join(why) or "no"


def _per_k(seconds: float | None, n: int) -> float | None:
    return None if seconds is None or n <= 0 else seconds * 1000.0 / n


def _one_run(
    opt: ConnsOptions,
    workers: int,
    r: int,
    tag: str,
    secret: str,
    redis_url: str,
    redis: psutil.Process | None,
) -> dict[str, Any]:
    base, _, query = opt.pg.partition("?")
    db = f"{base.rsplit('/', 1)[0]}/chatd_conns_{tag}_w{workers}" + (f"?{query}" if query else "")
    t_run = time.monotonic()
    tree = tree_state()
    with _round_db(["--db", db], r) as (db_args, pg):
        fleet = Fleet(
            workers,
            [
                *db_args,
                *("--broker", redis_url, "--broker-prefix", f"conns-{tag}-w{workers}-r{r}:"),
                f"--jwt-secret={secret}",  # one token: a secret may start with "-"
                *opt.serve_args,
            ],
        )
        left: list[int] = []
        try:
            pids = list(fleet.pids)
            nofile = fleet.nofile()
            backlog = listen_backlog(fleet.port)
            start = fleet.sample()
            hel = _phase(
                fleet, _specs(opt, fleet, opt.hellos, opt.hello_stall, secret, "h"), pg, redis
            )
            settle1 = fleet.settle()
            hold = _phase(
                fleet,
                _specs(opt, fleet, opt.target, opt.stall, secret, "k"),
                None,
                None,
                opt.hold_s,
            )
            settle2 = fleet.settle()
            alive = fleet.alive()
        finally:
            left = fleet.stop()
        warnings = [ln for ln in fleet.stderr if "WARNING" in ln or "ERROR" in ln]
    held = hold["held"]
    rss = hold["sample"]["rss"]
    row = {
        "workers": workers,
        "round": r,
        "tree": tree,
        "server_pids": pids,
        "server_alive_before_stop": alive,
        "server_left_running": left,
        "server_nofile": nofile,
        "listen_backlog": backlog,
        "rss_start": start["rss"],
        "fds_start": start["fds"],
        "settle_s": [round(settle1, 2), round(settle2, 2)],
        "run_s": round(time.monotonic() - t_run, 1),
        "hellos": hel,
        "hold": hold,
        "hellos_per_s": hel["rate"],
        "p50_ms": hel["p50_ms"],
        "p99_ms": hel["p99_ms"],
        "hello_errors": sum(hel["errors"].values()),
        "held": held,
        "rss_mib": rss / 2**20,
        "kib_per_conn": (rss - start["rss"]) / 1024 / held if held else None,
        "server_cpu_per_1k": _per_k(hel["server_cpu_s"], hel["welcomed"]),
        "pg_cpu_per_1k": _per_k(hel["pg_cpu_s"], hel["welcomed"]),
        "redis_cpu_per_1k": _per_k(hel["redis_cpu_s"], hel["welcomed"]),
        "gen_share": hel["gen_share"],
        "machine_busy": hel["machine_busy"],
        "others_share": hel["others_share"],
        "saturated": _saturated(hel),
        "hold_saturated": _saturated(hold),
        "hold_stop": "/".join("target" if h == "done" else h for h in hold["halts"]),
        "server_warnings": warnings[:50],
        "ok": hel["welcomed"] == hel["wanted"] and not left and alive == pids,
    }
    _print_run(row)
    return row


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _print_run(x: dict[str, Any]) -> None:
    h, k = x["hellos"], x["hold"]
    print(
        f"workers {x['workers']} r{x['round']}: hellos {h['welcomed']}/{h['wanted']} "
        f"{x['hellos_per_s']:,.0f}/s p50 {_f(x['p50_ms'], '.1f')} p99 {_f(x['p99_ms'], '.1f')} "
        f"max {_f(h['max_ms'], '.0f')} ms, errors {h['errors'] or 0}, "
        f"server {_f(x['server_cpu_per_1k'], '.2f')} postgres {_f(x['pg_cpu_per_1k'], '.2f')} "
        f"redis {_f(x['redis_cpu_per_1k'], '.3f')} CPU s/1k, generators "
        f"{x['gen_share']:.0%} of the machine (busiest process {h['gen_busiest']:.0%}), "
        f"machine {x['machine_busy']:.0%} busy (interrupts {h['irq_share']:.0%}, other "
        f"processes {h['others_share']:.0%}), saturated: {x['saturated']}, "
        f"accept-queue drops {h['listen_drops']} | "
        f"held {x['held']:,} of {k['wanted']:,} ({'/'.join(k['halts'])}; "
        f"{k['rate']:,.0f}/s while filling, errors {k['errors'] or 0}, lost {k['lost']}, "
        f"accept-queue drops {k['listen_drops']}), "
        f"open files {k['sample']['fds_by_pid']}, RSS {x['rss_mib']:,.0f} MiB "
        f"(start {x['rss_start'] / 2**20:,.0f}), {_f(x['kib_per_conn'], '.1f')} KiB/conn; "
        f"{x['run_s']:.0f} s" + ("" if x["ok"] else "  NOT OK"),
        flush=True,
    )


_COLS = (
    ("workers", "{:>7}", "workers"),
    ("round", "{:>5}", "round"),
    ("hellos/s", "{:>8,.0f}", "hellos_per_s"),
    ("p50 ms", "{:>7.1f}", "p50_ms"),
    ("p99 ms", "{:>7.1f}", "p99_ms"),
    ("errors", "{:>6,.0f}", "hello_errors"),
    ("held", "{:>7,.0f}", "held"),
    ("held until", "{:>10}", "hold_stop"),
    ("RSS MiB", "{:>7,.0f}", "rss_mib"),
    ("KiB/conn", "{:>8.1f}", "kib_per_conn"),
    ("srv CPU s/1k", "{:>12.2f}", "server_cpu_per_1k"),
    ("pg CPU s/1k", "{:>11.2f}", "pg_cpu_per_1k"),
    ("gen CPU", "{:>7.0%}", "gen_share"),
    ("machine", "{:>7.0%}", "machine_busy"),
    ("others", "{:>6.0%}", "others_share"),
    ("saturated", "{:>9}", "saturated"),
)


def _table(rows: list[dict[str, Any]]) -> str:
    head = " | ".join(name.rjust(len(fmt.format(_sample_value(fmt)))) for name, fmt, _ in _COLS)
    lines = [head, "-" * len(head)]
    for row in rows:
        cells = []
        for name, fmt, key in _COLS:
            width = max(len(name), len(fmt.format(_sample_value(fmt))))
            v = row.get(key)
            cells.append(("-" if v is None else fmt.format(v)).rjust(width))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def _sample_value(fmt: str) -> Any:
    if "%" in fmt or "f" in fmt:
        return 0.0
    return 0


def _medians(rows: list[dict[str, Any]], workers: Sequence[int]) -> list[dict[str, Any]]:
    out = []
    for w in workers:
        mine = [x for x in rows if x["workers"] == w]
        if not mine:
            continue
        med: dict[str, Any] = {"workers": w, "round": "med"}
        for _n, _fmt, key in _COLS[2:]:
            vals = [x[key] for x in mine if x[key] is not None]
            if key in ("saturated", "hold_stop"):
                med[key] = "/".join(sorted({str(v) for v in vals}))
            elif vals:
                med[key] = statistics.median(vals)
        out.append(med)
    return out


def tree_state() -> str:
    """The commit of the chatd tree served (`python -m chatd` runs this checkout), and how
    many of its server files differ from it (others may be editing them)."""
    root = Path(__file__).resolve().parents[1]
    git = shutil.which("git")
    if git is None or not (root / ".git").exists():
        return "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        run = [git, "-C", str(root)]
        sha = subprocess.run(
            [*run, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            [*run, "status", "--porcelain", "--", "chatd", "storage", "protocol"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.splitlines()
        return sha + (f" + {len(dirty)} changed file(s)" if dirty else "")
    return "unknown"


def run_conns(opt: ConnsOptions, out: Path | None = None) -> list[dict[str, Any]]:
    """Every run (workers alternating, `opt.rounds` rounds); prints a line per run and the
    table; writes conns.json into `out` when given."""
    raise_nofile()
    share = math.ceil(max(opt.target, opt.hellos) / max(1, opt.procs))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if share + opt.inflight + 64 > room:
        raise ValueError(
            f"{share:,} connections per generator process do not fit its open-file limit "
            f"({room:,}): use more --procs"
        )
    if not 1 <= opt.procs <= 250:
        raise ValueError("--procs: 1 to 250 (one source address 127.0.0.N each)")
    tag = secrets.token_hex(3)
    secret = secrets.token_urlsafe(32)
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        redis: psutil.Process | None = None
        redis_url = opt.redis
        if not redis_url:
            redis_url, redis = stack.enter_context(own_redis())
        print(
            f"== loadtest.conns: workers {','.join(map(str, opt.workers))} x {opt.rounds} "
            f"round(s); {opt.hellos:,} hellos, then hold up to {opt.target:,}; "
            f"{opt.procs} generator processes x {opt.inflight} in flight from 127.0.0.2-"
            f"{1 + opt.procs}; broker {redis_url} ({'own' if redis else 'shared'}); "
            f"{os.cpu_count()} cores; chatd {tree_state()} ==",
            flush=True,
        )
        for r in range(opt.rounds):
            for w in opt.workers:
                rows.append(_one_run(opt, w, r, tag, secret, redis_url, redis))
    if rows:
        lim = rows[0]["server_nofile"]
        print(
            f"\nserver open-file limit {lim:,} per process (connection budget "
            f"{budget_for(0, 0.25, lim).limit:,} at the default --pending-share); listen "
            f"backlog {rows[0]['listen_backlog']}; generators "
            f"{rows[0]['hold']['gen_nofile']:,} open files each"
        )
    print(_table(rows + _medians(rows, opt.workers)), flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "conns.json").write_text(
            json.dumps({"options": _opts_json(opt), "runs": rows}, indent=2, default=_bytes)
        )
    return rows


def _opts_json(opt: ConnsOptions) -> dict[str, Any]:
    d = dataclasses.asdict(opt)
    d["pg"] = opt.pg.split("@")[-1]
    return d


def _bytes(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    raise TypeError(type(v).__name__)


def _parser() -> argparse.ArgumentParser:
    d = ConnsOptions()
    p = argparse.ArgumentParser(
        prog="python -m loadtest.conns",
        description="hellos per second and connections held, chatd --workers 1 against 2",
    )
    p.add_argument("--workers", default="1,2", help="worker counts, alternated [1,2]")
    p.add_argument("--rounds", type=int, default=d.rounds, help=f"[{d.rounds}]")
    p.add_argument("--hellos", type=int, default=d.hellos, help=f"connections [{d.hellos}]")
    p.add_argument("--target", type=int, default=d.target, help=f"held at most [{d.target}]")
    p.add_argument("--procs", type=int, default=d.procs, help=f"generators [{d.procs}]")
    p.add_argument("--inflight", type=int, default=d.inflight, help=f"per generator [{d.inflight}]")
    p.add_argument("--stall", type=int, default=d.stall, help=f"failures in a row [{d.stall}]")
    p.add_argument("--hold-seconds", type=float, default=d.hold_s, help=f"[{d.hold_s}]")
    p.add_argument("--pg", default=os.environ.get("CHATD_TEST_PG", d.pg), help="admin URL")
    p.add_argument("--redis", default="", help="broker URL (default: a redis-server of its own)")
    p.add_argument("--serve-args", default="", help="more `chatd serve` flags, one string")
    p.add_argument("--out", type=Path, default=Path("reports/conns"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    opt = ConnsOptions(
        workers=tuple(int(w) for w in a.workers.split(",") if w.strip()),
        rounds=a.rounds,
        hellos=a.hellos,
        target=a.target,
        procs=a.procs,
        inflight=a.inflight,
        stall=a.stall,
        hold_s=a.hold_seconds,
        pg=a.pg,
        redis=a.redis,
        serve_args=tuple(shlex.split(a.serve_args)),
    )
    try:
        rows = run_conns(opt, a.out)
    except ValueError as exc:
        print(f"loadtest.conns: {exc}", file=sys.stderr)
        return 2
    return 0 if all(x["ok"] for x in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
