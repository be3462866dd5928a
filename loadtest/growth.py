"""How chatd's store behaves as it grows: seed millions of messages, then time the reads.

    python -m loadtest.growth --db postgresql://postgres@127.0.0.1:5432/chatd_growth \\
        --messages 1000000 --users 100000 --out reports/growth
    python -m loadtest.growth --db sqlite:////tmp/growth.db --messages 1000000

The database is created afresh (PostgreSQL: dropped and created; SQLite: the file
removed), migrated and seeded in the database itself (`loadtest.growth_seed`). Then,
through `SqlStore` as the server calls it:

- history: the newest page (50) of random conversations, and a page from the middle;
- convs of a user with 500 conversations (`heavy`, limit 500);
- catch-up of 1,000 pending events: `events(after=last-1000)` (a device with `since`)
  and `undelivered` (a device without), for `heavy`, whose stream is the longest;
- the send path: messages to random existing conversations, 50 in flight, the store's
  process CPU per message and PostgreSQL's (`loadtest.procstat`);
- EXPLAIN (ANALYZE, BUFFERS) on PostgreSQL, EXPLAIN QUERY PLAN on SQLite, of the
  statements the store sent for each read.

Prints a summary and writes `growth-<backend>-<messages>.json` into `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import sqlite3
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import event

from loadtest.growth_seed import Shape, conv_rows, seed_postgres, seed_sqlite
from loadtest.procstat import PostgresCpu
from storage.migrate import upgrade_async
from storage.sql import SqlStore
from storage.urls import asyncpg_dsn, normalize_url, sqlite_path

__all__ = ["main"]

Probe = Callable[[], Awaitable[object]]


def _remove_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


async def _fresh(url: str) -> None:
    path = sqlite_path(url)
    if path is not None:
        await asyncio.to_thread(_remove_sqlite, path)
    else:
        dsn = asyncpg_dsn(url)
        name = dsn.rsplit("/", 1)[1].split("?", 1)[0]
        admin = await asyncpg.connect(dsn.rsplit("/", 1)[0] + "/postgres", timeout=10)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
    await upgrade_async(url)


async def _timed(probe: Probe, runs: int) -> dict[str, float]:
    """p50 / p99 / max of `runs` calls, in ms."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await probe()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {
        "p50": round(statistics.median(times), 3),
        "p99": round(times[min(len(times) - 1, int(len(times) * 0.99))], 3),
        "max": round(times[-1], 3),
        "runs": runs,
    }


def _probes(store: SqlStore, shape: Shape, rng: random.Random) -> dict[str, Probe]:
    convs = list(conv_rows(Shape(shape.users, 0, min(shape.convs, 200_000), shape.heavy_convs)))
    depth = max(2, shape.messages // shape.convs)
    heavy = shape.heavy

    def pick() -> tuple[str, str]:
        _i, _c, a, b = rng.choice(convs)
        return a, b

    async def history_newest() -> object:
        a, b = pick()
        return await store.history(a, b, None, 50)

    async def history_middle() -> object:
        a, b = pick()
        return await store.history(a, b, depth // 2 + 1, 50)

    async def catch_up_since() -> object:
        last = await store.last_cur(heavy)
        return await store.events(heavy, max(0, last - 1000), last, 1000)

    async def catch_up_undelivered() -> object:
        return await store.undelivered(heavy, 0, await store.last_cur(heavy), 1000)

    async def convs_heavy() -> object:
        return await store.convs(heavy, 500)

    return {
        "history_newest_50": history_newest,
        "history_middle_50": history_middle,
        "convs_500": convs_heavy,
        "catch_up_since_1000": catch_up_since,
        "catch_up_undelivered_1000": catch_up_undelivered,
    }


async def _explain(url: str, store: SqlStore, probes: dict[str, Probe]) -> dict[str, str]:
    """The plan of each statement a probe sends (as the store sent it, with its values)."""
    engine = store._reads.engine
    assert engine is not None
    seen: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, stmt: str, params: Any, _ctx: Any, _many: bool) -> None:
        seen.append((stmt, params))

    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    plans: dict[str, str] = {}
    try:
        for name, probe in probes.items():
            seen.clear()
            await probe()
            stmts = [(s, p) for s, p in seen if s.strip().upper() != "BEGIN"]
            plans[name] = "\n---\n".join([await _plan(url, s, p) for s, p in stmts])
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", capture)
    return plans


async def _plan(url: str, stmt: str, params: Any) -> str:
    args = list(params or ())
    path = sqlite_path(url)
    if path is not None:
        with sqlite3.connect(path) as conn:
            rows = conn.execute("EXPLAIN QUERY PLAN " + stmt, args).fetchall()
        return stmt + "\n" + "\n".join(str(r[-1]) for r in rows)
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + stmt, *args)
    finally:
        await conn.close()
    return stmt + "\n" + "\n".join(r[0] for r in rows)


async def _send_path(url: str, store: SqlStore, shape: Shape, n: int) -> dict[str, Any]:
    """CPU per message of `n` sends to existing conversations, 50 in flight."""
    rng = random.Random(7)
    tag = f"growth-{time.time_ns()}"
    convs = list(conv_rows(Shape(shape.users, 0, min(shape.convs, 100_000), 0)))
    pg = None if sqlite_path(url) is not None else PostgresCpu(asyncpg_dsn(url).rsplit("/", 1)[1])
    if pg is not None:
        pg.start()
    cpu0, t0, batches0 = time.process_time(), time.perf_counter(), store.stats().batches
    for start in range(0, n, 50):
        jobs = []
        for i in range(start, min(n, start + 50)):
            _x, _c, a, b = rng.choice(convs)
            a, b = (a, b) if i % 2 else (b, a)
            jobs.append(store.send(a, b, f"{tag}-{i}", "x" * 60, "text", 1_800_000_000_000))
        await asyncio.gather(*jobs)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    out = {
        "messages": n,
        "rate_msg_s": round(n / wall, 1),
        "store_process_cpu_us_per_msg": round(cpu * 1e6 / n, 1),
        "batches": store.stats().batches - batches0,
    }
    if pg is not None:
        out["postgres_cpu_us_per_msg"] = round(pg.seconds() * 1e6 / n, 1)
    return out


async def run(url: str, shape: Shape, out: Path, *, seed: bool, runs: int, sends: int) -> None:
    url = normalize_url(url)
    report: dict[str, Any] = {"url": url, "shape": dataclasses.asdict(shape)}
    if seed:
        t0 = time.perf_counter()
        await _fresh(url)
        path = sqlite_path(url)
        if path is not None:
            await asyncio.to_thread(seed_sqlite, str(path), shape)
        else:
            await seed_postgres(asyncpg_dsn(url), shape)
        report["seed_s"] = round(time.perf_counter() - t0, 1)
        print(f"seeded in {report['seed_s']} s", flush=True)
    store = SqlStore(url)
    await store.open()
    try:
        probes = _probes(store, shape, random.Random(1))
        for probe in probes.values():  # warm the caches once
            await probe()
        report["reads_ms"] = {name: await _timed(p, runs) for name, p in probes.items()}
        report["plans"] = await _explain(url, store, probes)
        report["send_path"] = await _send_path(url, store, shape, sends)
    finally:
        await store.close()
    _print(report)
    backend = "sqlite" if sqlite_path(url) is not None else "postgres"
    await asyncio.to_thread(_write, out / f"growth-{backend}-{shape.messages}.json", report)


def _write(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


def _print(report: dict[str, Any]) -> None:
    print(f"\n== {report['url']}: {report['shape']} ==")
    if "seed_s" in report:
        print(f"seed: {report['seed_s']} s")
    for name, t in report["reads_ms"].items():
        print(f"{name:>28}: p50 {t['p50']} ms  p99 {t['p99']} ms  max {t['max']} ms")
    print(f"{'send path':>28}: {report['send_path']}")
    for name, plan in report["plans"].items():
        print(f"\n-- plan: {name}\n{plan}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.growth", description=__doc__)
    p.add_argument("--db", required=True, help="postgresql://.../NAME or sqlite:///FILE")
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--convs", type=int, default=0, help="conversations (0: users * 2)")
    p.add_argument("--runs", type=int, default=300, help="timed calls per read")
    p.add_argument("--sends", type=int, default=5000, help="messages of the send-path run")
    p.add_argument("--no-seed", action="store_true", help="measure the database as it is")
    p.add_argument("--out", default="reports/growth")
    a = p.parse_args(argv)
    shape = Shape(a.users, a.messages, a.convs or a.users * 2)
    asyncio.run(run(a.db, shape, Path(a.out), seed=not a.no_seed, runs=a.runs, sends=a.sends))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
