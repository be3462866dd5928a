"""`chatd-loadtest` / `python -m loadtest`: generate | replay | record | bench | check-trace."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--rate", type=float, default=1000.0, help="messages/s, all users together")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of messages")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--friends", type=int, default=5)
    p.add_argument("--zipf", type=float, default=1.2)
    p.add_argument("--pairs", action="store_true", help="user 2i talks only with 2i+1")
    p.add_argument("--size-median", type=float, default=60.0)
    p.add_argument("--size-sigma", type=float, default=1.0)
    p.add_argument("--read-prob", type=float, default=0.7)
    p.add_argument("--read-delay", type=float, default=2.0, help="median seconds before a read")
    p.add_argument("--typing-prob", type=float, default=0.3)
    p.add_argument("--offline-per-min", type=float, default=0.0)
    p.add_argument("--offline-median", type=float, default=3.0)
    p.add_argument(
        "--storm",
        action="append",
        default=[],
        metavar="AT:FRACTION:SPREAD",
        help="reconnect storm: at seconds, fraction of users, spread seconds (repeatable)",
    )
    p.add_argument(
        "--burst",
        action="append",
        default=[],
        metavar="AT:LENGTH:MULT",
        help="rate burst: at seconds, for seconds, rate multiplier (repeatable)",
    )


def _triples(items: list[str]) -> list[tuple[float, float, float]]:
    out = []
    for it in items:
        a, b, c = (float(x) for x in it.split(":"))
        out.append((a, b, c))
    return out


def _params(a: argparse.Namespace) -> object:
    from .generate import GenParams

    return GenParams(
        users=a.users,
        rate=a.rate,
        duration=a.duration,
        seed=a.seed,
        friends=a.friends,
        zipf=a.zipf,
        pairs=a.pairs,
        size_median=a.size_median,
        size_sigma=a.size_sigma,
        read_prob=a.read_prob,
        read_delay_median=a.read_delay,
        typing_prob=a.typing_prob,
        offline_per_min=a.offline_per_min,
        offline_median=a.offline_median,
        storms=_triples(a.storm),
        bursts=_triples(a.burst),
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chatd-loadtest", description="chatd load tester")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="write a synthetic trace")
    _gen_args(g)
    g.add_argument("-o", "--out", required=True, help="trace file (.jsonl or .jsonl.gz)")

    r = sub.add_parser("replay", help="replay a trace, open loop, and report")
    r.add_argument("trace")
    r.add_argument(
        "--url", action="append", required=True, help="ws://127.0.0.1:PORT/ws (repeatable)"
    )
    r.add_argument("--jwt-secret", default="", help="the server's secret, to mint tokens")
    r.add_argument("--tokens", default="", help="JSON file {user: token} instead of a secret")
    r.add_argument("--speed", type=float, default=1.0, help="time compression (10 = 10x faster)")
    r.add_argument("--procs", type=int, default=1)
    r.add_argument("--drain-timeout", type=float, default=15.0)
    r.add_argument(
        "--cmid-prefix", default="", help="prefix every cmid (replaying twice on one db)"
    )
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--no-charts", action="store_true")
    r.add_argument("--out", default="reports", help="report folder")
    r.add_argument("--name", default="replay")
    r.add_argument("--server-pid", type=int, default=0, help="read this local server's CPU/RSS")

    rec = sub.add_parser("record", help="turn a chatd database into a trace (ids hashed)")
    rec.add_argument("--from-db", required=True, help="sqlite:///FILE or postgresql://...")
    rec.add_argument("-o", "--out", required=True)
    rec.add_argument("--salt", default="", help="salt for hashing user ids")
    rec.add_argument("--since-ms", type=int, default=0, help="only messages with ts >= this")
    rec.add_argument("--until-ms", type=int, default=0)

    b = sub.add_parser("bench", help="run the scenarios in loadtest/scenarios/")
    b.add_argument("--out", default="reports")
    b.add_argument("--only", action="append", default=[], help="scenario name (repeatable)")
    b.add_argument("--procs", type=int, default=1)
    b.add_argument("--scale", type=float, default=1.0, help="multiply durations")

    s = sub.add_parser(
        "server-bench", help="the issue-2 benchmark (chatd vs group commit off vs relay)"
    )
    s.add_argument("--out", default="reports/server-bench")
    s.add_argument("--duration", type=float, default=15.0)
    s.add_argument("--rounds", type=int, default=1)
    s.add_argument("--procs", type=int, default=1)
    s.add_argument("--max-rate", type=float, default=0.0, help="skip the search: use this rate")
    s.add_argument("--idle", type=int, default=2000)

    ab = sub.add_parser("ab", help="chatd builds (source trees) measured alternately")
    ab.add_argument(
        "--build", action="append", required=True, help="NAME=DIR, a source tree (repeatable)"
    )
    ab.add_argument(
        "--extra", action="append", default=[], help="NAME='--flag value': serve flags of a build"
    )
    ab.add_argument(
        "--nodes",
        action="append",
        default=[],
        help="NAME=N: serve that build on N nodes joined by its --broker redis://... "
        "(user i on node i %% N: every pair spans two nodes)",
    )
    ab.add_argument(
        "--relay",
        action="store_true",
        help="also run loadtest/relay.py (the same frames, nothing stored) in every round",
    )
    ab.add_argument("--rate", type=float, default=2000.0)
    ab.add_argument("--duration", type=float, default=10.0)
    ab.add_argument("--rounds", type=int, default=3)
    ab.add_argument("--out", default="reports/ab")

    at = sub.add_parser("attacks", help="each attack of the security review beside a victim")
    at.add_argument("--build", action="append", required=True, help="NAME=DIR (repeatable)")
    at.add_argument("--attack", action="append", default=[], help="one of the attacks [all]")
    at.add_argument("--duration", type=float, default=10.0)
    at.add_argument("--convs", type=int, default=20_000, help="the attacker's conversations")
    at.add_argument("--replay-mb", type=float, default=16.0, help="the attacker's stream")

    c = sub.add_parser("check-trace", help="parse a trace and print its counts")
    c.add_argument("trace")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.command == "generate":
        from .generate import GenParams, generate
        from .trace import write_trace

        params = _params(a)
        assert isinstance(params, GenParams)
        t0 = time.monotonic()
        trace = generate(params)
        write_trace(trace, a.out)
        print(
            f"wrote {a.out}: {len(trace.users)} users, {trace.count('send'):,} sends, "
            f"{len(trace.events):,} events, {trace.duration:.1f} s ({time.monotonic() - t0:.1f} s)"
        )
        return 0
    if a.command == "check-trace":
        from .trace import KINDS, read_trace

        tr = read_trace(a.trace)
        print(
            json.dumps(
                {"users": len(tr.users), "duration": tr.duration, **{k: tr.count(k) for k in KINDS}}
            )
        )
        return 0
    if a.command == "replay":
        return _replay(a)
    if a.command == "record":
        from .record import record

        n = record(a.from_db, a.out, salt=a.salt, since_ms=a.since_ms, until_ms=a.until_ms)
        print(f"wrote {a.out}: {n:,} events")
        return 0
    if a.command == "bench":
        from .bench import run_scenarios

        return run_scenarios(Path(a.out), a.only, procs=a.procs, scale=a.scale)
    if a.command == "ab":
        from .ab import parse_builds, run_ab

        try:
            builds = parse_builds(a.build, a.extra, relay=a.relay, nodes=a.nodes)
        except ValueError as exc:
            print(f"chatd-loadtest: {exc}", file=sys.stderr)
            return 2
        return run_ab(builds, Path(a.out), rate=a.rate, duration=a.duration, rounds=a.rounds)
    if a.command == "attacks":
        from .ab import parse_builds
        from .attacks import ATTACKS, run_attacks

        builds = parse_builds(a.build, [])
        run_attacks(builds, a.attack or list(ATTACKS), a.duration, a.convs, a.replay_mb)
        return 0
    if a.command == "server-bench":
        from .bench_server import run_server_bench

        return run_server_bench(
            Path(a.out),
            duration=a.duration,
            rounds=a.rounds,
            procs=a.procs,
            max_rate=a.max_rate,
            idle=a.idle,
        )
    return 2


def _replay(a: argparse.Namespace) -> int:
    from .report import build_report, format_table, write_report
    from .runner import ReplayOptions, run_replay
    from .trace import read_trace

    for url in a.url:
        if not (url.startswith("ws://127.0.0.1") or url.startswith("ws://localhost")):
            print("chatd-loadtest: load targets must be on 127.0.0.1", file=sys.stderr)
            return 2
    trace = read_trace(a.trace)
    tokens = json.loads(Path(a.tokens).read_text()) if a.tokens else {}
    if not tokens and not a.jwt_secret:
        print("chatd-loadtest: give --jwt-secret or --tokens", file=sys.stderr)
        return 2
    opt = ReplayOptions(
        urls=a.url,
        jwt_secret=a.jwt_secret,
        tokens=tokens,
        speed=a.speed,
        procs=a.procs,
        drain_timeout=a.drain_timeout,
        progress=not a.no_progress,
        cmid_prefix=a.cmid_prefix,
    )
    ps = None
    cpu0 = 0.0
    if a.server_pid:
        import psutil  # type: ignore[import-untyped,unused-ignore]

        ps = psutil.Process(a.server_pid)
        ct = ps.cpu_times()
        cpu0 = ct.user + ct.system
    raw = run_replay(trace, opt)
    server = {}
    if ps is not None:
        ct = ps.cpu_times()
        server = {
            "pid": a.server_pid,
            "cpu_s": round(ct.user + ct.system - cpu0, 3),
            "rss_mib": round(ps.memory_info().rss / 2**20, 1),
        }
    rep = build_report(raw, name=a.name, server=server)
    print(format_table(rep))
    paths = write_report(rep, a.out, a.name, charts=not a.no_charts)
    print("report: " + ", ".join(str(p) for p in paths))
    return 0 if rep["verdict"]["ok"] else 1
