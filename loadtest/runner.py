"""Run a replay: fork workers (or one worker in this loop), merge, check, report."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing as mp
import os
import pickle
import queue
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engine import Worker, WorkerConfig, raise_nofile, to_events
from .trace import Trace

__all__ = ["ReplayOptions", "mint_tokens", "new_loop", "replay_inprocess", "run_replay"]


@dataclass(slots=True)
class ReplayOptions:
    urls: list[str]
    jwt_secret: str = ""
    tokens: dict[str, str] = field(default_factory=dict)
    speed: float = 1.0
    procs: int = 1
    drain_timeout: float = 15.0
    auto_delivered: bool = True
    device: str = "lt"
    progress: bool = True
    lead_in: float = 1.0
    """Seconds between the fork and trace time 0."""
    cmid_prefix: str = ""
    """Prefix of every cmid (use a fresh one to replay twice against the same database)."""


def mint_tokens(users: list[str], secret: str, ttl: float) -> dict[int, str]:
    from chatd.auth import Authenticator

    auth = Authenticator(secret)
    return {i: auth.mint(u, ttl) for i, u in enumerate(users)}


def _send_window(trace: Trace, speed: float) -> tuple[float, float]:
    """(first, last) scheduled send, in seconds from trace time 0 after `speed`."""
    ts = [e.t for e in trace.events if e.kind == "send"]
    return (min(ts) / speed, max(ts) / speed) if ts else (0.0, 0.0)


def _configs(trace: Trace, opt: ReplayOptions, start_ns: int) -> list[WorkerConfig]:
    users = trace.users
    index = {u: i for i, u in enumerate(users)}
    if opt.tokens:
        tokens = {index[u]: t for u, t in opt.tokens.items() if u in index}
    else:
        ttl = trace.duration / max(opt.speed, 1e-9) + 3600
        tokens = mint_tokens(users, opt.jwt_secret or "x", ttl)
    events = to_events(trace.events, index, opt.speed)
    procs = max(1, opt.procs)
    cfgs = []
    for w in range(procs):
        mine = [i for i in range(len(users)) if i % procs == w]
        mine_set = set(mine)
        cfgs.append(
            WorkerConfig(
                wid=w,
                users=users,
                mine=mine,
                tokens={i: tokens[i] for i in mine},
                urls=opt.urls,
                events=[e for e in events if e[1] in mine_set],
                start_ns=start_ns,
                device=opt.device,
                auto_delivered=opt.auto_delivered,
                drain_timeout=opt.drain_timeout,
                cmid_prefix=opt.cmid_prefix,
            )
        )
    return cfgs


def new_loop() -> asyncio.AbstractEventLoop:
    """A uvloop event loop where uvloop is installed (the load tester's processes)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def _worker_main(cfg: WorkerConfig, q: Any, stop_evt: Any, out: str) -> None:
    raise_nofile()

    def progress(d: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            q.put_nowait(("progress", d))

    def quiescent() -> None:
        q.put(("quiescent", cfg.wid))

    with asyncio.Runner(loop_factory=new_loop) as runner:
        res = runner.run(Worker(cfg, progress).run(stop_evt.is_set, quiescent))
    with open(out, "wb") as f:
        pickle.dump(res, f, protocol=pickle.HIGHEST_PROTOCOL)
    q.put(("done", cfg.wid))


class _Progress:
    def __init__(self, enabled: bool, total_sends: int, duration: float) -> None:
        self.bar: Any = None
        self.stats: dict[int, dict[str, Any]] = {}
        self.t0 = time.monotonic()
        if enabled:
            from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]

            self.bar = tqdm(
                total=total_sends, unit="msg", dynamic_ncols=True, file=sys.stderr, leave=True
            )

    def update(self, d: dict[str, Any]) -> None:
        self.stats[int(d["wid"])] = d
        if self.bar is None:
            return
        s = self.stats.values()
        fired = sum(x["fired"] for x in s)
        acked = sum(x["acked"] for x in s)
        el = max(1e-6, time.monotonic() - self.t0)
        self.bar.n = acked
        self.bar.set_postfix_str(
            f"offered {fired / el:,.0f}/s achieved {acked / el:,.0f}/s "
            f"p99 {max(x['p99_ms'] for x in s):.1f}ms lag {max(x['lag_ms'] for x in s):.1f}ms "
            f"err {sum(x['errors'] for x in s)} online {sum(x['online'] for x in s)}",
            refresh=False,
        )
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_replay(
    trace: Trace,
    opt: ReplayOptions,
    hook: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Fork `opt.procs` workers and replay; `hook(elapsed_trace_seconds)` is called from the
    parent every ~0.1 s (the bench's fault injector). Returns the merged raw result."""
    raise_nofile()
    cpu0 = time.process_time()
    start_ns = time.monotonic_ns() + int((opt.lead_in + 0.1 * opt.procs) * 1e9)
    cfgs = _configs(trace, opt, start_ns)
    ctx = mp.get_context("fork")
    q: Any = ctx.Queue()
    stop_evt = ctx.Event()
    tmp = tempfile.mkdtemp(prefix="chatd-lt-")
    procs = []
    outs = []
    for cfg in cfgs:
        out = os.path.join(tmp, f"worker-{cfg.wid}.pickle")
        outs.append(out)
        p = ctx.Process(target=_worker_main, args=(cfg, q, stop_evt, out), daemon=True)
        p.start()
        procs.append(p)
    n_sends = trace.count("send")
    bar = _Progress(opt.progress, n_sends, trace.duration / opt.speed)
    quiet: set[int] = set()
    done: set[int] = set()
    deadline = (
        time.monotonic() + opt.lead_in + trace.duration / opt.speed + 2 * opt.drain_timeout + 60
    )
    try:
        while len(done) < len(procs) and time.monotonic() < deadline:
            try:
                kind, val = q.get(timeout=0.1)
            except queue.Empty:
                kind, val = "", None
            if kind == "progress":
                bar.update(val)
            elif kind == "quiescent":
                quiet.add(val)
                if len(quiet) == len(procs):
                    stop_evt.set()
            elif kind == "done":
                done.add(val)
            if hook is not None:
                hook((time.monotonic_ns() - start_ns) / 1e9 * opt.speed)
            if any(not p.is_alive() and p.exitcode not in (0, None) for p in procs):
                break
    finally:
        stop_evt.set()
        bar.close()
        for p in procs:
            p.join(timeout=opt.drain_timeout + 30)
            if p.is_alive():
                p.kill()
                p.join(5)
    results = []
    for out, p in zip(outs, procs, strict=True):
        if not Path(out).exists():
            raise RuntimeError(f"worker pid {p.pid} failed (exit code {p.exitcode})")
        with open(out, "rb") as f:
            results.append(pickle.load(f))
        os.unlink(out)
    with contextlib.suppress(OSError):
        os.rmdir(tmp)
    return {
        "users": trace.users,
        "workers": results,
        "parent_cpu_s": time.process_time() - cpu0,
        "start_ns": start_ns,
        "speed": opt.speed,
        "procs": len(procs),
        "trace_duration": trace.duration,
        "send_window": _send_window(trace, opt.speed),
    }


async def replay_inprocess(trace: Trace, opt: ReplayOptions) -> dict[str, Any]:
    """One worker in the running loop (tests, or a server in the same process)."""
    start_ns = time.monotonic_ns() + int(opt.lead_in * 1e9)
    one = dataclasses.replace(opt, procs=1)
    cfg = _configs(trace, one, start_ns)[0]
    res = await Worker(cfg).run()
    return {
        "users": trace.users,
        "workers": [res],
        "parent_cpu_s": 0.0,
        "start_ns": start_ns,
        "speed": opt.speed,
        "procs": 1,
        "trace_duration": trace.duration,
        "send_window": _send_window(trace, opt.speed),
    }
