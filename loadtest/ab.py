"""A/B: chatd builds (source trees) measured alternately, in one sitting.

    git worktree add /tmp/before HEAD~3
    python -m loadtest ab --build before=/tmp/before --build after=. --rounds 3

Each round starts each build in turn and replays the same open-loop trace (by
default the issue-2 load: 200 users in 100 pairs, full path, 2,000 msg/s), then
records the server's CPU per acknowledged message and the send -> msg latency.
A build runs from its own tree (working directory and PYTHONPATH), so it imports
its own `chatd`, `protocol` and `storage` with this environment's libraries.
`--extra NAME='--commit-window-ms 3'` passes serve flags to one build (two names
may share a tree); with `--extra "NAME=--db postgresql://.../DB"` the run also
reports PostgreSQL's own CPU per message (`loadtest.procstat`). Every run reports
how busy the whole machine was. `--relay` adds `loadtest/relay.py` (the same frames, nothing
stored) to every round: the floor that chatd's CPU per message is read against.
Alternating spreads the machine's drift over every build: compare builds within one
run, never with another day's numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shlex
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil  # type: ignore[import-untyped,unused-ignore]
from prometheus_client.parser import text_string_to_metric_families

from .bench_server import issue2_trace
from .procstat import MachineBusy, PostgresCpu
from .report import build_report
from .runner import ReplayOptions, run_replay
from .servers import ServerProc, start_chatd, start_relay
from .trace import Trace

__all__ = ["Build", "parse_builds", "run_ab"]


@dataclass(frozen=True, slots=True)
class Build:
    name: str
    tree: Path | None
    """None: the bare websockets relay (`loadtest/relay.py`), not a chatd build."""
    extra: list[str] = field(default_factory=list)
    nodes: int = 1
    """Nodes served at once (> 1: a fleet; `extra` names the Redis broker and PostgreSQL);
    user i connects to node i % nodes, so every pair of the trace spans two nodes."""


def parse_builds(
    builds: list[str], extras: list[str], relay: bool = False, nodes: list[str] | None = None
) -> list[Build]:
    """`NAME=DIR` builds and `NAME=FLAGS` extras -> Builds (and the relay, last, when
    `relay`); ValueError when malformed."""
    counts: dict[str, int] = {}
    for n in nodes or []:
        name, sep, digits = n.partition("=")
        if not sep or not digits.isdigit() or int(digits) < 1:
            raise ValueError(f"--nodes {n!r}: expected NAME=N")
        counts[name] = int(digits)
    flags: dict[str, list[str]] = {}
    for e in extras:
        name, sep, args = e.partition("=")
        if not sep:
            raise ValueError(f"--extra {e!r}: expected NAME=FLAGS")
        flags[name] = shlex.split(args)
    out: list[Build] = []
    for b in builds:
        name, sep, tree = b.partition("=")
        path = Path(tree).resolve()
        if not sep or not name:
            raise ValueError(f"--build {b!r}: expected NAME=DIR")
        if not (path / "chatd" / "__init__.py").is_file():
            raise ValueError(f"--build {b!r}: {path} holds no chatd package")
        extra = flags.pop(name, [])
        count = counts.pop(name, 1)
        if count > 1 and not any(a.startswith("redis") for a in extra):
            raise ValueError(f"--nodes {name}={count}: its --extra needs --broker redis://...")
        out.append(Build(name, path, extra, count))
    if flags or counts:
        unknown = ", ".join(sorted({*flags, *counts}))
        raise ValueError(f"--extra or --nodes for unknown builds: {unknown}")
    if relay:
        out.append(Build("relay", None))
    if len({b.name for b in out}) != len(out):
        raise ValueError("build names must differ")
    return out


def _pg_db_index(extra: list[str]) -> int | None:
    """Where the PostgreSQL URL of `--db postgresql://...` is in `extra`, if it is."""
    for i, arg in enumerate(extra[:-1]):
        if arg == "--db" and extra[i + 1].startswith(("postgres://", "postgresql")):
            return i + 1
    return None


async def _pg_admin(url: str, sql: str) -> None:
    import asyncpg  # the store's driver: only for builds served on PostgreSQL

    dsn = url.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(dsn.rsplit("/", 1)[0] + "/postgres", timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def _round_db(extra: list[str], r: int) -> Iterator[tuple[list[str], PostgresCpu | None]]:
    """A build's serve flags for round `r`: a `--db postgresql://.../NAME` becomes a fresh
    database NAME_r<r> (created here, dropped after), with the CPU of its PostgreSQL
    processes; other builds keep their flags (SQLite: a fresh file per round anyway)."""
    i = _pg_db_index(extra)
    if i is None:
        yield extra, None
        return
    base, _, query = extra[i].partition("?")
    name = f"{base.rsplit('/', 1)[1]}_r{r}"
    url = f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")
    asyncio.run(_pg_admin(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    asyncio.run(_pg_admin(url, f'CREATE DATABASE "{name}"'))
    try:
        yield [*extra[:i], url, *extra[i + 1 :]], PostgresCpu(name)
    finally:
        asyncio.run(_pg_admin(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _per_msg(seconds: float | None, rep: dict[str, Any]) -> float | None:
    acked = rep["throughput"].get("acked_msgs") or 0
    if seconds is None or not acked:
        return None
    return round(seconds * 1e6 / acked, 1)


def run_ab(
    builds: list[Build],
    out: Path,
    *,
    rate: float = 2000.0,
    duration: float = 10.0,
    rounds: int = 3,
    users: int = 200,
) -> int:
    """Run every build once per round, alternating; print a line per run and a summary.
    0 when every run delivered every message exactly once, in order."""
    out.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    trace = issue2_trace(rate, duration, users)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="chatd-ab-") as td:
        for r in range(rounds):
            for b in builds:
                with _round_db(b.extra, r) as (extra, pg):
                    row = _run_one(b, r, trace, secret, Path(td), extra, pg)
                runs.append(row)
    print(f"\n== {rate:,.0f} msg/s, {duration:g} s, {rounds} round(s), builds alternating ==")
    for b in builds:
        mine = [x for x in runs if x["build"] == b.name]
        cpus = ", ".join(str(x["server_us_per_msg"]) for x in mine)
        p99s = ", ".join(str(x["send_msg_p99"]) for x in mine)
        pgs = ", ".join(str(x["pg_us_per_msg"]) for x in mine)
        pg_part = f"   postgres µs/msg: {pgs}" if any(x["pg_us_per_msg"] for x in mine) else ""
        print(f"{b.name:>12}  server µs/msg: {cpus}{pg_part}   send->msg p99 ms: {p99s}")
    (out / "ab.json").write_text(
        json.dumps(
            {
                "rate": rate,
                "duration": duration,
                "builds": [
                    {"name": b.name, "tree": str(b.tree or "relay"), "extra": b.extra}
                    for b in builds
                ],
                "runs": runs,
            },
            indent=2,
        )
    )
    return 0 if all(x["ok"] for x in runs) else 1


def _run_one(
    b: Build,
    r: int,
    trace: Trace,
    secret: str,
    td: Path,
    extra: list[str],
    pg: PostgresCpu | None,
) -> dict[str, Any]:
    """One replay of `trace` against build `b` (served with `extra`, on `b.nodes` nodes):
    its row, printed."""
    srvs = _start(b, r, secret, td, extra)
    busy = MachineBusy()
    redis = RedisCpu(extra)
    try:
        cpu0 = [srv.cpu_s() for srv in srvs]
        busy.start()
        redis.start()
        if pg is not None:
            pg.start()
        opts = ReplayOptions(
            urls=[srv.url for srv in srvs], jwt_secret=secret, drain_timeout=30.0, progress=False
        )
        raw = run_replay(trace, opts)
        cpu = sum(srv.cpu_s() - c for srv, c in zip(srvs, cpu0, strict=True))
        pg_s = None if pg is None else pg.seconds()  # before the backends exit
        redis_s = redis.seconds()
        machine = busy.share()
        counted = _scrape(srvs) if b.tree is not None else {}
    finally:
        for srv in srvs:
            srv.stop()
    rep = build_report(raw, name=f"{b.name}-r{r}", server={"cpu_s": round(cpu, 3)})
    lat = rep["latency_ms"]["delivery_live"]
    row = {
        "build": b.name,
        "round": r,
        "achieved": rep["throughput"]["achieved_rate"],
        "server_us_per_msg": rep["server"].get("cpu_us_per_msg"),
        "tester_us_per_msg": rep["tester"]["cpu_us_per_msg"],
        "tester_saturated": rep["tester"]["saturated"],
        "send_msg_p50": lat.get("p50"),
        "send_msg_p99": lat.get("p99"),
        "ok": rep["verdict"]["ok"],
        "pg_us_per_msg": _per_msg(pg_s, rep),
        "redis_us_per_msg": _per_msg(redis_s, rep),
        "nodes": b.nodes,
        "machine_busy": round(machine, 3),
        "metrics": counted,
    }
    conflicts, batches = (
        counted.get("chatd_storage_conflicts"),
        counted.get("chatd_storage_batches"),
    )
    print(
        f"{b.name:>12} r{r}  achieved {row['achieved']:>8,.1f} msg/s  "
        f"server {row['server_us_per_msg']} µs/msg  "
        + (f"postgres {row['pg_us_per_msg']} µs/msg  " if pg is not None else "")
        + (f"redis {row['redis_us_per_msg']} µs/msg  " if redis_s is not None else "")
        + (f"conflicts {conflicts:.0f}/{batches:.0f} batches  " if conflicts and batches else "")
        + f"machine busy {machine:.0%}  "
        f"send->msg p50 {row['send_msg_p50']} p99 {row['send_msg_p99']} ms  "
        f"tester saturated {'YES' if row['tester_saturated'] else 'no'}  "
        f"{'OK' if row['ok'] else 'NOT OK'}",
        flush=True,
    )
    return row


def _start(b: Build, r: int, secret: str, td: Path, extra: list[str]) -> list[ServerProc]:
    """The relay, or the build's node(s): the first migrates, the others join it."""
    if b.tree is None:
        return [start_relay()]
    db = td / f"{b.name}-{r}.db"
    if b.nodes == 1:
        return [start_chatd(db, secret, extra=extra, tree=b.tree)]
    srvs: list[ServerProc] = []
    try:
        for i in range(b.nodes):
            more = ["--node-id", f"{b.name}-{i}"] + (["--migrate", "false"] if i else [])
            srvs.append(start_chatd(db, secret, extra=[*extra, *more], tree=b.tree))
    except BaseException:
        for srv in srvs:
            srv.stop()
        raise
    return srvs


_SCRAPED = (
    "chatd_storage_conflicts",
    "chatd_storage_locked_batches",
    "chatd_storage_batches",
    "chatd_fleet_limit_checks",
)


def _scrape(srvs: list[ServerProc]) -> dict[str, float]:
    """A few counters of the nodes' /metrics, summed over nodes (and labels); a build
    that does not export one leaves it out."""
    out: dict[str, float] = {}
    for srv in srvs:
        try:
            url = f"http://127.0.0.1:{srv.port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            continue
        for family in text_string_to_metric_families(text):
            if family.name in _SCRAPED:
                total = sum(s.value for s in family.samples if s.name.endswith("_total"))
                out[family.name] = out.get(family.name, 0.0) + total
    return out


class RedisCpu:
    """The CPU of the redis-server a build's `--broker redis://HOST:PORT` names, when it
    runs on this machine (found by its listening port); None otherwise."""

    def __init__(self, extra: list[str]) -> None:
        self._proc: psutil.Process | None = None
        self._t0 = 0.0
        port = next((urlsplit(a).port or 6379 for a in extra if a.startswith("redis://")), None)
        if port is None:
            return
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
                self._proc = psutil.Process(conn.pid)
                return

    def start(self) -> None:
        if self._proc is not None:
            self._t0 = float(sum(self._proc.cpu_times()[:2]))

    def seconds(self) -> float | None:
        if self._proc is None:
            return None
        return float(sum(self._proc.cpu_times()[:2])) - self._t0
