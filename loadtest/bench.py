"""`python -m loadtest bench --out reports/`: run every scenario in loadtest/scenarios/*.json.

Each scenario starts its own chatd subprocess (127.0.0.1, port 0, a temp SQLite
database, raised open-files limit), so the bench can read the server's PID,
CPU time and RSS. Kinds:
- "replay": generate a trace (the "gen" parameters) and replay it;
- "idle": open N authenticated connections and report server KiB per connection;
- "fault": replay, SIGKILL the server at `kill_at` s, restart it on the same port
  and database `down` s later; clients reconnect, resume with `since`, resend
  unacknowledged sends with the same cmid; exactly-once is still checked.
"""

from __future__ import annotations

import json
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from .bench_server import idle_memory
from .generate import GenParams, generate
from .report import build_report, format_table, write_report
from .runner import ReplayOptions, run_replay
from .servers import ServerProc, start_chatd

__all__ = ["load_scenarios", "run_scenario", "run_scenarios"]

SCENARIOS = Path(__file__).with_name("scenarios")


def load_scenarios(only: list[str] | None = None) -> list[dict[str, Any]]:
    out = []
    for p in sorted(SCENARIOS.glob("*.json")):
        sc = json.loads(p.read_text())
        sc.setdefault("name", p.stem)
        if not only or sc["name"] in only:
            out.append(sc)
    return out


def run_scenario(
    sc: dict[str, Any], out: Path, procs: int = 1, scale: float = 1.0
) -> dict[str, Any]:
    secret = secrets.token_urlsafe(32)
    name = sc["name"]
    with tempfile.TemporaryDirectory(prefix=f"chatd-{name}-") as td:
        tmp = Path(td)
        if sc.get("kind") == "idle":
            res = idle_memory("chatd", int(sc.get("connections", 2000)), tmp, secret)
            (out / f"{name}.json").write_text(json.dumps(res, indent=2))
            print(json.dumps(res), flush=True)
            return {"name": name, "ok": res["connected"] == res["connections"], **res}
        gen = dict(sc.get("gen", {}))
        gen["duration"] = float(gen.get("duration", 20)) * scale
        for key in ("storms", "bursts"):
            gen[key] = [tuple(x) for x in gen.get(key, [])]
        trace = generate(GenParams(**gen))
        db = tmp / "chatd.db"
        extra = [str(x) for x in sc.get("server_args", [])]
        srv = start_chatd(db, secret, extra=extra)
        state: dict[str, Any] = {"srv": srv, "cpu": 0.0, "killed": False, "restarted": False}
        fault = sc.get("fault") if sc.get("kind") == "fault" else None

        def hook(elapsed: float) -> None:
            if fault is None:
                return
            s: ServerProc = state["srv"]
            if not state["killed"] and elapsed >= float(fault["kill_at"]):
                state["cpu"] += s.cpu_s()
                s.kill()  # SIGKILL, by PID: a crash, no graceful shutdown
                state["killed"] = True
                state["killed_at"] = time.monotonic()
                print(f"[{name}] SIGKILLed chatd pid {s.pid} at {elapsed:.1f} s", flush=True)
            elif (
                state["killed"]
                and not state["restarted"]
                and time.monotonic() >= state["killed_at"] + float(fault.get("down", 1.0))
            ):
                ns = start_chatd(db, secret, port=s.port, extra=extra)
                state["srv"] = ns
                state["restarted"] = True
                print(f"[{name}] restarted chatd as pid {ns.pid} on port {ns.port}", flush=True)

        opt = ReplayOptions(
            urls=[srv.url],
            jwt_secret=secret,
            procs=int(sc.get("procs", procs)),
            drain_timeout=float(sc.get("drain_timeout", 30)),
            progress=True,
        )
        cpu0 = srv.cpu_s()
        try:
            raw = run_replay(trace, opt, hook=hook)
            cur: ServerProc = state["srv"]
            cpu = state["cpu"] + cur.cpu_s() - (cpu0 if cur is srv else 0.0)
            server = {
                "cpu_s": round(cpu, 3),
                "rss_mib": round(cur.rss() / 2**20, 1),
                "args": " ".join(extra),
            }
            if fault is not None:
                server["killed_and_restarted"] = bool(state["restarted"])
        finally:
            state["srv"].stop()
            srv.stop()
        rep = build_report(raw, name=name, server=server, extra={"scenario": sc})
        write_report(rep, out, name)
        print(format_table(rep), flush=True)
        return {
            "name": name,
            "ok": rep["verdict"]["ok"],
            **rep["throughput"],
            "tester": rep["tester"],
            "verdict": {k: v for k, v in rep["verdict"].items() if k != "examples"},
        }


def run_scenarios(out: Path, only: list[str], procs: int = 1, scale: float = 1.0) -> int:
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for sc in load_scenarios(only):
        print(f"== scenario {sc['name']} ==", flush=True)
        results.append(run_scenario(sc, out, procs=procs, scale=scale))
    (out / "bench-summary.json").write_text(json.dumps(results, indent=2, default=str))
    ok = all(r.get("ok") for r in results)
    print(f"bench: {len(results)} scenarios, {'all OK' if ok else 'FAILURES'}; reports in {out}")
    return 0 if ok else 1
