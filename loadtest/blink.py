"""Redis blink: latency of a two-node fleet while its Redis is killed (or stalled) and back.

    flock /tmp/chatd-bench.lock python -m loadtest.blink --how none --out reports/blink-none
    flock /tmp/chatd-bench.lock python -m loadtest.blink --how kill --out reports/blink-kill
    python -m loadtest.blink --from reports/blink-kill/blink.json \
        --control reports/blink-none/blink.json --chart reports/blink-kill/vs-control.svg

Starts its own redis-server (127.0.0.1, a free port), a fresh PostgreSQL database
`chatd_blink_<pid>` (dropped at the end) and two `chatd serve` nodes n1 and n2 on them
(`--broker redis://...`, prefix `blink:`, one JWT secret). The issue-2 load (pairs 2i <->
2i+1, user i on node i % 2: every pair spans both nodes, full path with `delivered`
receipts) runs open loop for `--duration` s at `--rate` msg/s (`engine.Worker`). At
`--at` s (from the first send) the redis-server is SIGKILLed (`--how kill`) or SIGTERMed
(`term`), and a new one starts on the same port after `--downtime` s; `stall` SIGSTOPs it
for `--downtime` s and SIGCONTs it; `none` does nothing (the control run). Only
processes started here are signalled, by PID.

Times are on the send schedule (open loop: a send's time is when it was due). Per
`--bucket` of send time: send -> msg at the recipient (p50, p99, max) and send -> sent
(S). The summary gives the phases (before: from 1 s after the first send to 1 s before
the fault; Redis down; 5 s after it is back; the rest); when everything sent before
Redis returned had been delivered (relative to Redis accepting again); when the 1-s
window p99 is back under the pre-restart p99 (and stays within the pre-restart
windows' range); with `--control` (a `none` run's blink.json), when every second's p99
is back within the control's highest over the same stretch (the load's own drift set
aside); the nodes' log lines on the same clock; and per second the CPU of the machine,
of the nodes and of PostgreSQL, and the gaps filled from storage. A run that other
work shared the cores with is marked DISTURBED. Every acknowledged message must
arrive exactly once, in order (`checker.check`): exit status 1 otherwise. Outputs in
`--out`: blink.json, buckets.csv, summary.txt, the nodes' and Redis' logs, and the
chart (`--chart`, SVG or PNG by its suffix). `--from` summarizes and draws a saved
blink.json again, without a run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import datetime
import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil  # type: ignore[import-untyped,unused-ignore]

from .checker import check
from .generate import GenParams, generate
from .procstat import MachineBusy, PostgresCpu
from .redis_server import RedisServer
from .runner import ReplayOptions, run_replay
from .servers import BENCH_LIMITS, _raise_nofile

__all__ = ["HOWS", "BlinkOptions", "Timeline", "analyze", "main", "run_blink"]

HOWS = ("kill", "term", "stall", "none")
"""SIGKILL, SIGTERM (then a new redis-server on the port), SIGSTOP (then SIGCONT), or
no fault at all: the control run, the same load with Redis up throughout."""
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
_START_S = 30.0
_LISTENING = re.compile(r"listening on (ws://\S+)")
_LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+): (.*)$"
)
_QUIET_LOGGERS = ("chatd.session", "chatd.connection", "chatd.handshake", "websockets")
_AFTER_S = 5.0
"""The phase "just after": this many seconds of sends from Redis' return."""
_WARMUP_S = 1.0
"""The first second of sends is left out of the pre-restart phase, and so is the last
second before the fault (those sends may still be on their way when Redis goes)."""
_DISTURBED_CORES = 0.25
"""Cores used by other processes (not this run's nodes, PostgreSQL or tester) above which
the summary says the run was disturbed."""


@dataclass(slots=True)
class BlinkOptions:
    duration: float = 30.0
    rate: float = 1000.0
    users: int = 200
    at: float = 10.0
    """Seconds from the first send to the fault."""
    downtime: float = 3.0
    how: str = "kill"
    bucket: float = 0.25
    window: float = 1.0
    """Seconds of sends per window of the "back to steady" test."""
    pg_admin: str = PG_ADMIN
    out: Path = Path("reports/blink")
    chart: Path | None = None
    extra: list[str] = field(default_factory=list)
    """More `chatd serve` flags for both nodes."""
    procs: int = 1
    drain_timeout: float = 30.0
    seed: int = 7

    def check(self) -> None:
        if self.how not in HOWS:
            raise ValueError(f"--how {self.how!r}: one of {', '.join(HOWS)}")
        if self.users < 2 or self.users % 2:
            raise ValueError("--users: an even number, at least 2 (pairs)")
        if self.at <= 0 or self.downtime <= 0 or self.at + self.downtime >= self.duration:
            raise ValueError("need 0 < --at, 0 < --downtime and --at + --downtime < --duration")
        if self.rate <= 0 or self.bucket <= 0 or self.window < self.bucket:
            raise ValueError("need --rate > 0, --bucket > 0 and --window >= --bucket")


@dataclass(slots=True)
class Timeline:
    """The fault's moments, in seconds from the first scheduled send."""

    down: float
    """The signal (SIGKILL, SIGTERM or SIGSTOP) was sent."""
    up: float
    """The new redis-server answered PING (kill, term), or SIGCONT was sent (stall)."""
    exited: float | None = None
    """The old redis-server had exited (kill, term)."""


# ---------------------------------------------------------------------- processes


class Node:
    """`chatd serve` whose log (stderr) goes to a file; ended by its PID."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            preexec_fn=_raise_nofile,
            env={**os.environ, **BENCH_LIMITS},
        )
        self.url = ""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + _START_S
        while not self.url and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if m := _LISTENING.search(line):
                self.url = m.group(1)
        if not self.url:
            self.stop()
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} did not start: {' '.join(argv)}\n{tail}")
        threading.Thread(target=_drain, args=(self.proc.stdout,), daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/", 1)[0])

    def cpu_s(self) -> float:
        t = psutil.Process(self.proc.pid).cpu_times()
        return float(t.user + t.system)

    def metrics(
        self, prefix: tuple[str, ...] = ("chatd_broker_", "chatd_gap_")
    ) -> dict[str, float]:
        """The node's /metrics samples whose names start with `prefix` (labels summed)."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        out: dict[str, float] = {}
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = resp.read().decode()
        except OSError:
            return out
        for line in body.splitlines():
            if line.startswith(prefix):
                name, _, value = line.rpartition(" ")
                name = name.split("{", 1)[0].removesuffix("_total")
                with contextlib.suppress(ValueError):
                    out[name] = out.get(name, 0.0) + float(value)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15.0)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10.0)
        self._log.close()


def _drain(stream: Iterable[str]) -> None:
    with contextlib.suppress(Exception):
        for _ in stream:
            pass


def _pg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _pg_db_url(admin: str, name: str) -> str:
    base, sep, query = _pg_dsn(admin).partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if sep else "")


async def _pg_admin(admin: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(_pg_dsn(admin), timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


class CpuSampler:
    """A thread that samples, every `every` s, the machine's busy and total CPU ticks
    and the CPU seconds of this run's nodes and PostgreSQL backends (for the table: was
    the machine ours?)."""

    def __init__(self, nodes: Sequence[Node], pg: PostgresCpu, every: float = 0.5) -> None:
        self.nodes, self.pg, self.every = nodes, pg, every
        self.samples: list[tuple[int, int, int, float, float]] = []
        """(monotonic ns, busy ticks, total ticks, CPU s of the nodes, of PostgreSQL)."""
        self.fills: list[tuple[int, float, float]] = []
        """(monotonic ns, gap repairs, events read back for gaps): the nodes' sums."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        nodes = 0.0
        for n in self.nodes:
            with contextlib.suppress(psutil.Error):
                nodes += n.cpu_s()
        pg = self.pg.seconds()
        self.samples.append((time.monotonic_ns(), sum(vals) - idle, sum(vals), nodes, pg))

    def _scrape(self) -> None:
        got = [n.metrics(("chatd_gap_",)) for n in self.nodes]
        repairs = sum(m.get("chatd_gap_repairs", 0.0) for m in got)
        fills = sum(m.get("chatd_gap_fills", 0.0) for m in got)
        self.fills.append((time.monotonic_ns(), repairs, fills))

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.every):
            with contextlib.suppress(OSError, ValueError):
                self._sample()
            n += 1
            if n % 2 == 0:
                self._scrape()

    def start(self) -> None:
        self.pg.start()
        self._sample()
        self._scrape()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def per_second(self, origin_ns: int, seconds: int) -> list[dict[str, float]]:
        """Per second from `origin_ns`, between the samples around it (NaN past them):
        the machine's busy share, the cores used by the nodes and by PostgreSQL, and
        the nodes' gap repairs and events read back for gaps per second."""
        out = []
        nan = math.nan
        for sec in range(seconds):
            a, b = origin_ns + sec * 1_000_000_000, origin_ns + (sec + 1) * 1_000_000_000
            row = dict.fromkeys(("machine_busy", "nodes_cores", "postgres_cores"), nan)
            row |= dict.fromkeys(("gap_repairs", "gap_fills"), nan)
            before = [x for x in self.samples if x[0] <= a]
            after = [x for x in self.samples if x[0] >= b]
            if before and after:
                (t0, b0, n0, c0, p0), (t1, b1, n1, c1, p1) = before[-1], after[0]
                dt = (t1 - t0) / 1e9
                row["machine_busy"] = (b1 - b0) / max(1, n1 - n0)
                row["nodes_cores"], row["postgres_cores"] = (c1 - c0) / dt, (p1 - p0) / dt
            f0 = [x for x in self.fills if x[0] <= a]
            f1 = [x for x in self.fills if x[0] >= b]
            if f0 and f1:
                dt = (f1[0][0] - f0[-1][0]) / 1e9
                row["gap_repairs"] = (f1[0][1] - f0[-1][1]) / dt
                row["gap_fills"] = (f1[0][2] - f0[-1][2]) / dt
            out.append(row)
        return out


# ---------------------------------------------------------------------- the fault


class Fault:
    """The replay's hook (called from the main thread every <= 0.1 s with the trace's
    elapsed seconds): takes Redis down at `at` and brings it back `downtime` later,
    sleeping up to 0.15 s to hit each moment. Times are time.monotonic_ns()."""

    _AHEAD = 0.15

    def __init__(self, redis: RedisServer, how: str, at: float, downtime: float) -> None:
        self.redis, self.how, self.at, self.downtime = redis, how, at, downtime
        self.down_ns = self.up_ns = self.exited_ns = 0

    def __call__(self, elapsed: float) -> None:
        if not self.down_ns and elapsed >= self.at - self._AHEAD:
            _sleep_until(elapsed, self.at)
            self.down_ns = time.monotonic_ns()
            if self.how == "stall":
                self.redis.pause()
            elif self.how != "none":
                self.redis.kill(signal.SIGKILL if self.how == "kill" else signal.SIGTERM)
                self.exited_ns = time.monotonic_ns()
        elif self.down_ns and not self.up_ns and elapsed >= self.at + self.downtime - self._AHEAD:
            _sleep_until(elapsed, self.at + self.downtime)
            if self.how == "stall":
                self.redis.resume()
            elif self.how != "none":
                self.redis.start()  # the same port; returns once it answers PING
            self.up_ns = time.monotonic_ns()


def _sleep_until(elapsed: float, target: float) -> None:
    if target > elapsed:
        time.sleep(target - elapsed)


# ---------------------------------------------------------------------- analysis


def _pct(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of sorted values (NaN for none)."""
    n = len(sorted_values)
    if not n:
        return math.nan
    return sorted_values[min(n - 1, max(0, math.ceil(p / 100.0 * n) - 1))]


def _stats(values: Iterable[float]) -> dict[str, float]:
    v = sorted(values)
    return {"n": len(v), "p50": _pct(v, 50), "p99": _pct(v, 99), "max": v[-1] if v else math.nan}


@dataclass(slots=True)
class Msg:
    send: float
    """Seconds from the first scheduled send."""
    s_ms: float
    """send -> sent."""
    recv: float | None
    """When it first reached the recipient (same clock), None: lost."""
    key: tuple[int, str]
    to: int

    @property
    def d_ms(self) -> float:
        return math.inf if self.recv is None else (self.recv - self.send) * 1000.0


def messages(raw: dict[str, Any], origin_ns: int) -> list[Msg]:
    """One Msg per acknowledged message (the first `sent` and the first `msg` of each)."""
    first_recv: dict[tuple[int, str], int] = {}
    for w in raw["workers"]:
        for r in w["recv"]:
            key = (r[4], str(r[5]))
            if key not in first_recv or r[7] < first_recv[key]:
                first_recv[key] = r[7]
    out: dict[tuple[int, str], Msg] = {}
    for w in raw["workers"]:
        for s in w["sent"]:
            key = (s[0], str(s[1]))
            if key in out:
                continue
            t_recv = first_recv.get(key)
            out[key] = Msg(
                send=(s[6] - origin_ns) / 1e9,
                s_ms=(s[7] - s[6]) / 1e6,
                recv=None if t_recv is None else (t_recv - origin_ns) / 1e9,
                key=key,
                to=s[2],
            )
    return sorted(out.values(), key=lambda m: m.send)


def _windows(
    msgs: Sequence[Msg], start: float, end: float, width: float, step: float
) -> list[tuple[float, float]]:
    """(window start, p99 of send -> msg in ms) of windows [t, t + width) within [start, end)."""
    sends = [m.send for m in msgs]
    out = []
    i = j = 0
    t = start
    while t + width <= end + 1e-9:
        while i < len(sends) and sends[i] < t:
            i += 1
        while j < len(sends) and sends[j] < t + width:
            j += 1
        if j > i:
            out.append((t, _pct(sorted(m.d_ms for m in msgs[i:j]), 99)))
        t = round(t + step, 9)
    return out


def analyze(
    msgs: Sequence[Msg], tl: Timeline, duration: float, bucket: float = 0.25, window: float = 1.0
) -> dict[str, Any]:
    """Buckets, phases and the recovery numbers (see the module docstring). `msgs`
    sorted by send time."""
    buckets: list[dict[str, Any]] = []
    for k in range(math.ceil(duration / bucket - 1e-9)):
        t0 = k * bucket
        mine = [m for m in msgs if t0 <= m.send < t0 + bucket]
        d, s = _stats(m.d_ms for m in mine), _stats(m.s_ms for m in mine)
        buckets.append(
            {
                "t": round(t0, 6),
                "sends": len(mine),
                "lost": sum(m.recv is None for m in mine),
                **{f"d_{name}": v for name, v in d.items() if name != "n"},
                **{f"s_{name}": v for name, v in s.items() if name != "n"},
            }
        )
    phases = {
        "before": (_WARMUP_S, tl.down - _WARMUP_S),
        "down": (tl.down, tl.up),
        f"first {_AFTER_S:g} s after": (tl.up, tl.up + _AFTER_S),
        "rest": (tl.up + _AFTER_S, math.inf),
    }
    phase_stats: dict[str, Any] = {}
    for name, (a, b) in phases.items():
        mine = [m for m in msgs if a <= m.send < b]
        phase_stats[name] = {
            "from": a,
            "to": min(b, duration),
            "send_msg_ms": _stats(m.d_ms for m in mine),
            "send_sent_ms": _stats(m.s_ms for m in mine),
        }
    pre_p99 = phase_stats["before"]["send_msg_ms"]["p99"]

    def last_of(sel: list[Msg]) -> dict[str, Any] | None:
        if not sel:
            return None
        worst = max(sel, key=lambda m: math.inf if m.recv is None else m.recv)
        return {
            "after_up_s": None if worst.recv is None else worst.recv - tl.up,
            "sent_at": worst.send,
            "received_at": worst.recv,
            "sender": worst.key[0],
            "cmid": worst.key[1],
            "to": worst.to,
        }

    pre_windows = _windows(msgs, _WARMUP_S, tl.down - _WARMUP_S, window, bucket)
    envelope = max((p for _, p in pre_windows), default=math.nan)
    post = _windows(msgs, tl.up, duration, window, bucket)
    first_back = next((t for t, p in post if p <= pre_p99), None)
    settled = None
    for t, p in reversed(post):
        if not p <= envelope:  # NaN envelope (no pre-restart windows): never
            break
        settled = t
    return {
        "buckets": buckets,
        "phases": phase_stats,
        "pre_p99_ms": pre_p99,
        "pre_window_p99_max_ms": envelope,
        "last_sent_before_up": last_of([m for m in msgs if m.send < tl.up]),
        "last_sent_while_down": last_of([m for m in msgs if tl.down <= m.send < tl.up]),
        "p99_back_after_up_s": None if first_back is None else first_back - tl.up,
        "p99_settled_after_up_s": None if settled is None else settled - tl.up,
        "post_windows": post,
    }


def _log_events(
    nodes: Sequence[Node], origin_wall: float, until: float, limit: int = 40
) -> list[dict[str, Any]]:
    """The nodes' log lines (not the per-connection ones) from the first send on, on the
    send clock; a repeat of a line (digits aside) within 1 s is counted, not listed."""
    out: list[dict[str, Any]] = []
    for node in nodes:
        last: dict[str, dict[str, Any]] = {}
        for line in node.log_path.read_text(errors="replace").splitlines():
            m = _LOG_LINE.match(line)
            if m is None or m.group(3).startswith(_QUIET_LOGGERS):
                continue
            stamp = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
            t = stamp.timestamp() - origin_wall
            if t < -0.5 or t > until:
                continue
            shape = node.name + re.sub(r"\d+", "#", m.group(4))
            prev = last.get(shape)
            if prev is not None and t - prev["last"] <= 1.0:
                prev["count"] += 1
                prev["last"] = t
                continue
            ev = {"t": t, "last": t, "node": node.name, "level": m.group(2)}
            ev |= {"logger": m.group(3), "msg": m.group(4), "count": 1}
            last[shape] = ev
            out.append(ev)
    out.sort(key=lambda e: e["t"])
    return out[:limit]


# ---------------------------------------------------------------------- output


def _f(x: Any, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "LOST"
    return f"{x:,.{nd}f}"


def _signed(x: float | None) -> str:
    return "never" if x is None else f"{x:+.2f} s"


def format_summary(res: dict[str, Any]) -> str:
    o, tl, a, v = res["options"], res["timeline"], res["analysis"], res["verdict"]
    ctl = res.get("control")
    control = o["how"] == "none"
    fault = (
        f"no fault (control run; the fault's window: +{tl['down']:.2f} to +{tl['up']:.2f} s)"
        if control
        else f"redis {o['how']} at +{tl['down']:.2f} s, back (accepting) at +{tl['up']:.2f} s "
        f"(down {tl['up'] - tl['down']:.2f} s)"
    )
    lines = [
        f"== blink: {fault}; 2 nodes, {o['users']} users, "
        f"{o['rate']:,.0f} msg/s for {o['duration']:g} s ==",
        f"messages: {v['sent']:,} acknowledged, {v['delivered']:,} delivered; lost {v['lost']}, "
        f"duplicated {v['duplicated']}, out of order {v['reordered']}, unacked {v['unacked']}, "
        f"missing D receipts {v['missing_receipt']}, unexpected {v['unexpected']} -> "
        + ("OK" if v["ok"] else "NOT OK"),
        f"{'phase (by send time)':26} {'sends':>7} {'S p50':>7} {'S p99':>7} {'S max':>7}"
        f" {'msg p50':>8} {'msg p99':>8} {'msg max':>8}  (ms)",
    ]
    for name, ph in a["phases"].items():
        d, s = ph["send_msg_ms"], ph["send_sent_ms"]
        if not d["n"]:
            continue
        span = f"{name} [{ph['from']:.1f},{ph['to']:.1f})"
        lines.append(
            f"{span:26} {d['n']:>7,} {_f(s['p50']):>7} {_f(s['p99']):>7} {_f(s['max']):>7}"
            f" {_f(d['p50']):>8} {_f(d['p99']):>8} {_f(d['max']):>8}"
        )
    users = res["users"]
    down, before = a["last_sent_while_down"], a["last_sent_before_up"]
    for x, what in (
        (down, "sent in the fault's window" if control else "sent while Redis was down"),
        (before, "sent before the window's end" if control else "sent before Redis returned"),
    ):
        same = down is not None and x is not None and x["sender"] == down["sender"]
        if x is not None and (x is down or not same or x["cmid"] != down["cmid"]):
            lines.append(
                f"everything {what}: delivered {_signed(x['after_up_s'])} after Redis returned "
                f"(last: {users[x['sender']]} -> {users[x['to']]} cmid {x['cmid']}, sent "
                f"+{x['sent_at']:.2f} s)"
            )
    lines.append(
        f"live p99 (1-s windows of sends) back under the pre-restart p99 "
        f"({_f(a['pre_p99_ms'])} ms): {_signed(a['p99_back_after_up_s'])} after Redis returned; "
        f"within the pre-restart windows' max ({_f(a['pre_window_p99_max_ms'])} ms) for good "
        f"from {_signed(a['p99_settled_after_up_s'])}"
    )
    if ctl:
        lines.append(
            f"live p99 back within the control run's ({ctl['path']}: no fault, same load; its"
            f" highest per-second p99 from the window's end on: {_f(ctl['envelope_p99_ms'])} ms),"
            f" every second from then on: {_signed(ctl['like_control_after_up_s'])} after Redis"
            " returned" + ("" if ctl["same_load"] else " (NOT the same load: compare with care)")
        )
    t = res["tester"]
    lines.append(
        f"tester: schedule lag p99 {_f(t['lag_p99_ms'], 2)} ms, connections lost "
        f"{t['conn_lost']}, errors {t['errors']}"
    )
    c = res["cpu"]
    lines.append(
        f"machine: {c['machine_busy']:.0%} busy of {c['cores']} cores over the run; this run's "
        f"nodes {c['nodes_cores']:.2f}, PostgreSQL {c['postgres_cores']:.2f}, tester "
        f"{c['tester_cores']:.2f} cores; everything else (other work, Redis) "
        f"{max(c['others_cores'], 0.0):.2f}"
        + (" -> DISTURBED by other work" if c["others_cores"] > _DISTURBED_CORES else "")
    )
    for name, m in res["node_metrics"].items():
        keys = ("published", "received", "dropped", "reconnects", "resyncs")
        lines.append(
            f"{name} broker: "
            + ", ".join(f"{k} {m.get('chatd_broker_' + k, 0):,.0f}" for k in keys)
            + f"; gaps filled from storage {m.get('chatd_gap_repairs', 0):,.0f}"
            f" ({m.get('chatd_gap_fills', 0):,.0f} events)"
        )
    lines.append("timeline (s from the first send; chatd log lines of the nodes):")
    sig = {"kill": "SIGKILL", "term": "SIGTERM", "stall": "SIGSTOP", "none": "no signal"}[o["how"]]
    back = {"stall": "SIGCONT", "none": "nothing was done"}.get(
        o["how"], "a new redis-server answers PING"
    )
    marks = [
        {"t": tl["down"], "text": f"== redis {o['how']} ({sig})"},
        {"t": tl["up"], "text": f"== redis back: {back}"},
    ]
    if tl.get("exited") is not None:
        marks.append({"t": tl["exited"], "text": "== the old redis-server has exited"})
    evs = [{"t": e["t"], "text": _event_text(e)} for e in res["log_events"]] + marks
    for e in sorted(evs, key=lambda e: e["t"]):
        lines.append(f"  {e['t']:+7.3f}  {e['text']}")
    lines.append(
        "per second of sends (ms; busy: the machine's busy share; nodes, pg: cores used by the"
        " nodes, by PostgreSQL; gaps/s: stream gaps filled from storage, both nodes"
        + ("; ctl p99: the control run's msg p99 in the same second" if ctl else "")
        + "):"
    )
    lines.append(
        f"  {'t':>4} {'sends':>6} {'S p99':>8} {'msg p50':>8} {'msg p99':>8} {'max':>8}"
        + (f" {'ctl p99':>8}" if ctl else "")
        + f" {'busy':>5} {'nodes':>5} {'pg':>5} {'gaps/s':>7}"
    )
    for row in res["messages_by_second"]:
        flag = " <- redis down" if row["t"] + 1 > tl["down"] and row["t"] < tl["up"] else ""
        busy = row["machine_busy"]
        lines.append(
            f"  {row['t']:>4.0f} {row['sends']:>6,} {_f(row['s_p99']):>8} {_f(row['d_p50']):>8}"
            f" {_f(row['d_p99']):>8} {_f(row['d_max']):>8}"
            + (f" {_f(row.get('ctl_p99')):>8}" if ctl else "")
            + f" {'-' if busy is None else f'{busy:.0%}':>5} {_f(row['nodes_cores'], 2):>5}"
            f" {_f(row['postgres_cores'], 2):>5} {_f(row['gap_repairs'], 0):>7}{flag}"
        )
    return "\n".join(lines)


def _event_text(e: dict[str, Any]) -> str:
    more = f" (x{e['count']} until {e['last']:+.2f})" if e["count"] > 1 else ""
    return f"{e['node']} {e['level']} {e['logger']}: {e['msg'][:140]}{more}"


def _by_second(msgs: Sequence[Msg], cpu: Sequence[dict[str, float]]) -> list[dict[str, Any]]:
    out = []
    for sec, more in enumerate(cpu):
        mine = [m for m in msgs if sec <= m.send < sec + 1]
        d, s = _stats(m.d_ms for m in mine), _stats(m.s_ms for m in mine)
        out.append(
            {
                "t": sec,
                "sends": len(mine),
                "s_p99": s["p99"],
                "d_p50": d["p50"],
                "d_p99": d["p99"],
                "d_max": d["max"],
                **more,
            }
        )
    return out


def with_control(res: dict[str, Any], control: dict[str, Any], path: str) -> None:
    """Set `res["control"]` from the blink.json of a control run (`--how none`): its msg
    p99 per bucket (the chart) and per second (the table), and when, after Redis
    returned, every second's p99 is at most the highest per-second p99 of the control
    over the same stretch (from the fault window's end on): the latency is back within
    what this load does on this machine without a fault (its drift set aside)."""
    keys = ("rate", "users", "duration", "bucket", "seed")
    same = all(res["options"].get(k) == control["options"].get(k) for k in keys)
    theirs = {r["t"]: r["d_p99"] for r in control["messages_by_second"]}
    rows = res["messages_by_second"]
    for r in rows:
        r["ctl_p99"] = theirs.get(r["t"])
    up = res["timeline"]["up"]
    after = [r for r in rows if r["t"] + 1 > up]
    envelope = max((r["ctl_p99"] for r in after if r["ctl_p99"] is not None), default=None)
    back = None
    for r in reversed(after):
        if envelope is None or r["d_p99"] is None or r["d_p99"] > envelope:
            break
        back = r["t"]
    res["control"] = {
        "path": path,
        "same_load": same,
        "envelope_p99_ms": envelope,
        "like_control_after_up_s": None if back is None else max(back - up, 0.0),
        "buckets_p99": [(b["t"], b["d_p99"]) for b in control["analysis"]["buckets"]],
    }


def draw_chart(res: dict[str, Any], path: Path) -> None:
    """x: send time, y: latency (ms, log); Redis' outage shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    o, tl, a = res["options"], res["timeline"], res["analysis"]
    b = a["buckets"]
    x = [row["t"] + o["bucket"] / 2 for row in b]

    def col(name: str) -> list[float]:
        return [math.nan if row[name] is None or math.isinf(row[name]) else row[name] for row in b]

    fig, ax = plt.subplots(figsize=(11, 6.5))
    control = o["how"] == "none"
    ax.axvspan(
        tl["down"],
        tl["up"],
        color="tab:grey" if control else "tab:red",
        alpha=0.15,
        label="the fault's window (no fault: control run)"
        if control
        else f"Redis down ({o['how']})",
    )
    ax.plot(x, col("d_max"), color="tab:purple", lw=1.0, alpha=0.7, label="send → msg max")
    ax.plot(x, col("d_p99"), color="tab:red", lw=1.5, label="send → msg p99")
    ax.plot(x, col("d_p50"), color="tab:blue", lw=1.5, label="send → msg p50")
    ax.plot(x, col("s_p99"), color="tab:green", lw=1.2, ls="--", label="send → sent (S) p99")
    ctl = res.get("control")
    if ctl:
        cx = [t + o["bucket"] / 2 for t, _ in ctl["buckets_p99"]]
        cy = [math.nan if p is None else p for _, p in ctl["buckets_p99"]]
        ax.plot(cx, cy, color="grey", lw=1.0, alpha=0.8, label="control run (no fault): msg p99")
    pre = a["pre_p99_ms"]
    if pre is not None and pre == pre:  # None (JSON) or NaN: no pre-restart sends
        ax.axhline(pre, color="grey", lw=0.8, ls=":", label=f"pre-restart p99 {pre:.1f} ms")
    last = a["last_sent_before_up"]
    if last is not None and last["received_at"] is not None:
        ax.axvline(
            last["received_at"],
            color="black",
            lw=0.8,
            ls="-.",
            label=f"all sent before Redis returned delivered ({last['after_up_s']:+.2f} s)",
        )
    back = [
        e for e in res["log_events"] if "pubsub connection of" in e["msg"] and "back" in e["msg"]
    ]
    for i, e in enumerate(back):
        label = "a node's broker resubscribed (" + ", ".join(x["node"] for x in back) + ")"
        ax.axvline(e["t"], color="tab:orange", lw=0.8, ls=":", label=None if i else label)
    ax.set_yscale("log")
    ax.set_xlim(0, o["duration"])
    ax.set_xlabel("send time; vertical lines: moments on the same clock (s from the first send)")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title(
        (
            "chatd, 2 nodes + Redis: no fault (control) — "
            if control
            else f"chatd, 2 nodes + Redis: redis {o['how']} for {tl['up'] - tl['down']:.1f} s — "
        )
        + f"{o['users']} users, {o['rate']:,.0f} msg/s, {o['bucket'] * 1000:.0f} ms buckets"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=3, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _clean(x: Any) -> Any:
    """JSON without NaN/Infinity (None instead)."""
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def _git_state() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "chatd", "storage"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.split("\n")  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"head": head, "dirty": [d.strip() for d in dirty if d.strip()]}


# ---------------------------------------------------------------------- the run


def run_blink(opt: BlinkOptions) -> dict[str, Any]:
    """Everything of one run (see the module docstring); writes the outputs and returns
    the result (its "verdict" says whether every message arrived once, in order)."""
    opt.check()
    out = opt.out
    out.mkdir(parents=True, exist_ok=True)
    params = GenParams(
        users=opt.users,
        pairs=True,
        rate=opt.rate,
        duration=opt.duration,
        seed=opt.seed,
        typing_prob=0.0,
        read_prob=0.0,
        history_prob=0.0,
        start=1.0,
    )
    trace = generate(params)
    first_send = params.connect_spread + params.start
    secret = secrets.token_urlsafe(32)
    db = f"chatd_blink_{os.getpid()}"
    db_url = _pg_db_url(opt.pg_admin, db)
    redis = RedisServer(out)
    nodes: list[Node] = []
    created = False
    try:
        redis.start()
        asyncio.run(_pg_admin(opt.pg_admin, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        asyncio.run(_pg_admin(opt.pg_admin, f'CREATE DATABASE "{db}"'))
        created = True
        for i in (1, 2):
            argv = [
                *(sys.executable, "-m", "chatd", "serve", "--host", "127.0.0.1", "--port", "0"),
                *("--db", db_url, "--broker", redis.url, "--broker-prefix", "blink:"),
                *("--node-id", f"n{i}", f"--jwt-secret={secret}", "--log-level", "INFO"),
                *(["--migrate", "false"] if i > 1 else []),
                *opt.extra,
            ]
            nodes.append(Node(f"n{i}", argv, out / f"n{i}.log"))
        fault = Fault(redis, opt.how, first_send + opt.at, opt.downtime)
        replay = ReplayOptions(
            urls=[n.url for n in nodes],
            jwt_secret=secret,
            procs=opt.procs,
            drain_timeout=opt.drain_timeout,
            progress=False,
        )
        busy, pg = MachineBusy(), PostgresCpu(db)
        busy.start()
        pg.start()
        sampler = CpuSampler(nodes, PostgresCpu(db))
        sampler.start()
        node_cpu0 = [n.cpu_s() for n in nodes]
        mono0, wall0 = time.monotonic_ns(), time.time()
        raw = run_replay(trace, replay, hook=fault)
        end_ns = time.monotonic_ns()
        wall_s = (end_ns - mono0) / 1e9
        pg_s = pg.seconds()  # before the backends exit
        node_s = sum(n.cpu_s() - c for n, c in zip(nodes, node_cpu0, strict=True))
        machine = busy.share()
        sampler.stop()
        node_metrics = {n.name: n.metrics() for n in nodes}
    finally:
        for n in nodes:
            n.stop()
        redis.stop()
        if created:
            asyncio.run(_pg_admin(opt.pg_admin, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
    if not fault.up_ns:
        raise RuntimeError("the replay ended before Redis was back")
    origin_ns = int(raw["start_ns"] + first_send * 1e9)
    origin_wall = wall0 + (origin_ns - mono0) / 1e9

    def rel(ns: int) -> float:
        return (ns - origin_ns) / 1e9

    tl = Timeline(
        down=rel(fault.down_ns),
        up=rel(fault.up_ns),
        exited=rel(fault.exited_ns) if fault.exited_ns else None,
    )
    msgs = messages(raw, origin_ns)
    workers = raw["workers"]
    verdict = check(
        [s for w in workers for s in w["sent"]],
        [r for w in workers for r in w["recv"]],
        [c for w in workers for c in w["rcpt"]],
        [u for w in workers for u in w["unacked"]],
        names=raw["users"],
    )
    lag: array[int] = array("q")
    errors: dict[str, int] = {}
    for w in workers:
        lag.frombytes(w["lag"])
        for k, n in w["errors"].items():
            errors[k] = errors.get(k, 0) + n
    analysis = analyze(msgs, tl, opt.duration, opt.bucket, opt.window)
    tester_s = sum(float(w["cpu_s"]) for w in workers) + float(raw["parent_cpu_s"])
    cores = os.cpu_count() or 1
    cpu = {
        "cores": cores,
        "wall_s": wall_s,
        "machine_busy": machine,
        "nodes_cores": node_s / wall_s,
        "postgres_cores": pg_s / wall_s,
        "tester_cores": tester_s / wall_s,
        "others_cores": machine * cores - (node_s + pg_s + tester_s) / wall_s,
    }
    cpu["disturbed"] = cpu["others_cores"] > _DISTURBED_CORES
    until = rel(end_ns)  # not the shutdown
    res: dict[str, Any] = {
        "options": {
            "duration": opt.duration,
            "rate": opt.rate,
            "users": opt.users,
            "at": opt.at,
            "downtime": opt.downtime,
            "how": opt.how,
            "bucket": opt.bucket,
            "window": opt.window,
            "extra": opt.extra,
            "procs": opt.procs,
        },
        "git": _git_state(),
        "timeline": {"down": tl.down, "up": tl.up, "exited": tl.exited},
        "verdict": verdict.summary(raw["users"]),
        "users": raw["users"],
        "tester": {
            "lag_p99_ms": _pct(sorted(lag), 99) / 1e6 if lag else None,
            "conn_lost": errors.get("conn_lost", 0),
            "errors": errors,
        },
        "node_metrics": node_metrics,
        "cpu": cpu,
        "analysis": analysis,
        "messages_by_second": _by_second(
            msgs, sampler.per_second(origin_ns, math.ceil(opt.duration))
        ),
        "log_events": _log_events(nodes, origin_wall, until),
    }
    res = _clean(res)
    (out / "blink.json").write_text(json.dumps(res, indent=1))
    with open(out / "buckets.csv", "w", newline="") as f:
        rows = res["analysis"]["buckets"]
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    chart = opt.chart or out / f"blink-{opt.how}.svg"
    draw_chart(res, chart)
    res["chart"] = str(chart)
    return res


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.blink",
        description="Latency of a two-node chatd fleet while its Redis is restarted.",
    )
    d = BlinkOptions()
    p.add_argument("--duration", type=float, default=d.duration, help="seconds of sends")
    p.add_argument("--rate", type=float, default=d.rate, help="messages/s, all users")
    p.add_argument("--users", type=int, default=d.users, help="users (pairs 2i <-> 2i+1)")
    p.add_argument("--at", type=float, default=d.at, help="seconds from the first send")
    p.add_argument("--downtime", type=float, default=d.downtime, help="seconds Redis is away")
    p.add_argument(
        "--how", choices=HOWS, default=d.how, help="SIGKILL, SIGTERM, SIGSTOP or no fault"
    )
    p.add_argument("--bucket", type=float, default=d.bucket, help="seconds per bucket")
    p.add_argument("--window", type=float, default=d.window, help="seconds per steady window")
    p.add_argument("--pg-admin", default=os.environ.get("CHATD_TEST_PG", d.pg_admin))
    p.add_argument("--out", type=Path, default=None, help="default reports/blink-HOW")
    p.add_argument("--chart", type=Path, default=None, help="SVG or PNG (default in --out)")
    p.add_argument("--extra", default="", help="more `chatd serve` flags for both nodes")
    p.add_argument("--procs", type=int, default=d.procs, help="load tester processes")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--control",
        type=Path,
        default=None,
        help="blink.json of a control run (--how none, same load): compare with it",
    )
    p.add_argument(
        "--from",
        dest="saved",
        type=Path,
        default=None,
        help="no run: summarize a saved blink.json again (with --control, --chart)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import shlex

    a = _parser().parse_args(argv)
    opt = BlinkOptions(
        duration=a.duration,
        rate=a.rate,
        users=a.users,
        at=a.at,
        downtime=a.downtime,
        how=a.how,
        bucket=a.bucket,
        window=a.window,
        pg_admin=a.pg_admin,
        out=a.out or Path(f"reports/blink-{a.how}"),
        chart=a.chart,
        extra=shlex.split(a.extra),
        procs=a.procs,
        seed=a.seed,
    )
    if a.saved is not None:
        res = json.loads(a.saved.read_text())
        opt.out = a.saved.parent
    else:
        try:
            opt.check()
        except ValueError as exc:
            print(f"blink: {exc}", file=sys.stderr)
            return 2
        res = run_blink(opt)
    if a.control is not None:
        with_control(res, json.loads(a.control.read_text()), str(a.control))
    if a.control is not None or a.saved is not None:
        res["chart"] = str(opt.chart or opt.out / f"blink-{res['options']['how']}.svg")
        draw_chart(res, Path(res["chart"]))
    text = format_summary(res)
    if a.saved is None:
        (opt.out / "summary.txt").write_text(text + "\n")
    print(text)
    print(f"chart: {res['chart']}; data: {opt.out}/blink.json, {opt.out}/buckets.csv")
    return 0 if res["verdict"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
