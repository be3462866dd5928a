"""Merge worker results into a report: table, JSON, PNG charts."""

from __future__ import annotations

import json
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checker import check
from .hist import encode_ns, merge, summary

__all__ = ["build_report", "format_table", "write_charts", "write_report"]

LEGS = (
    ("send_sent", "send -> sent (S)"),
    ("delivery_live", "send -> msg at recipient (live)"),
    ("delivery_catchup", "send -> msg at recipient (catch-up after resume)"),
    ("delivered_receipt", "msg -> delivered receipt at sender (D)"),
    ("connect_welcome", "connect -> welcome"),
    ("reconnect_synced", "reconnect -> synced"),
    ("schedule_lag", "tester lag: fired - scheduled"),
)
SATURATION_LAG_MS = 10.0
SATURATION_CPU = 0.9


def _arr(b: bytes) -> array[int]:
    a: array[int] = array("q")
    a.frombytes(b)
    return a


def build_report(
    raw: dict[str, Any],
    *,
    name: str = "replay",
    server: dict[str, Any] | None = None,
    receipts: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report (a JSON-able dict) plus, under "_series", per-second series for charts."""
    workers = raw["workers"]
    users: Sequence[str] = raw["users"]
    sent = [s for w in workers for s in w["sent"]]
    recv = [r for w in workers for r in w["recv"]]
    rcpt = [c for w in workers for c in w["rcpt"]]
    unacked = [x for w in workers for x in w["unacked"]]
    res = check(sent, recv, rcpt, unacked, receipts=receipts, names=users)

    hists = {
        leg: merge(w["hists"][leg] for w in workers)
        for leg, _ in LEGS
        if leg != "delivered_receipt"
    }
    hists["delivered_receipt"] = merge([encode_ns(res.d_lat_ns)])
    latency = {leg: summary(hists[leg]) for leg, _ in LEGS}

    start = int(raw["start_ns"])
    speed = float(raw["speed"])
    duration = float(raw["trace_duration"]) / speed
    fired = sum(int(w["fired_sends"]) for w in workers)
    acked = res.sent
    first_s, last_s = raw.get("send_window") or (0.0, duration)
    offered_window = max(last_s - first_s, 1e-9)
    last_sent = max((s[7] for s in sent), default=start)
    window = max(offered_window, (last_sent - start) / 1e9 - first_s, 1e-9)
    errors: dict[str, int] = {}
    counts: dict[str, int] = {}
    for w in workers:
        for k, v in w["errors"].items():
            errors[k] = errors.get(k, 0) + v
        for k, v in w["counts"].items():
            counts[k] = counts.get(k, 0) + v

    cpu = sum(float(w["cpu_s"]) for w in workers) + float(raw.get("parent_cpu_s", 0.0))
    busiest = max((float(w["cpu_s"]) / max(float(w["wall_s"]), 1e-9) for w in workers), default=0.0)
    lag_p99 = latency["schedule_lag"].get("p99", 0.0)
    reasons = []
    if lag_p99 > SATURATION_LAG_MS:
        reasons.append(
            f"fired events lagged the schedule: p99 {lag_p99:.1f} ms > {SATURATION_LAG_MS} ms"
        )
    if busiest > SATURATION_CPU:
        reasons.append(f"a tester process used {busiest:.0%} of a core")
    tester = {
        "procs": raw["procs"],
        "cpu_s": round(cpu, 3),
        "cpu_us_per_msg": round(cpu / acked * 1e6, 1) if acked else None,
        "busiest_proc_core_share": round(busiest, 3),
        "saturated": bool(reasons),
        "saturation": reasons or ["no: the schedule was kept and no tester process was CPU-bound"],
    }
    if server and acked and "cpu_s" in server:
        server = {**server, "cpu_us_per_msg": round(server["cpu_s"] / acked * 1e6, 1)}
    report: dict[str, Any] = {
        "name": name,
        "users": len(users),
        "duration_s": round(duration, 3),
        "throughput": {
            "offered_msgs": fired,
            "offered_rate": round(fired / offered_window, 1),
            "acked_msgs": acked,
            "achieved_rate": round(acked / window, 1),
            "delivered_msgs": res.delivered,
        },
        "latency_ms": latency,
        "errors": dict(sorted(errors.items())),
        "counts": dict(sorted(counts.items())),
        "tester": tester,
        "server": server or {},
        "verdict": res.summary(),
        **(extra or {}),
    }
    report["_series"] = _series(sent, recv, start)
    return report


def _series(sent: list[Any], recv: list[Any], start: int) -> dict[str, Any]:
    import numpy as np

    if not sent:
        return {}
    t_sched = {(s[0], str(s[1])): s[6] for s in sent}
    ts = np.array([s[6] for s in sent], dtype=np.int64)
    tsent = np.array([s[7] for s in sent], dtype=np.int64)
    s_lat = (tsent - ts) / 1e6
    first: dict[tuple[Any, str], int] = {}
    for r in recv:
        first.setdefault((r[4], str(r[5])), r[7])
    pairs = [(t, t - t_sched[k]) for k, t in first.items() if k in t_sched]
    tr = np.array([p[0] for p in pairs], dtype=np.int64)
    d_lat = np.array([p[1] for p in pairs], dtype=np.int64) / 1e6
    end = int(max(tsent.max(), tr.max() if len(tr) else 0) - start) // 10**9 + 1
    secs = np.arange(0, max(end, 1))

    def per_sec(t: Any) -> Any:
        b = ((t - start) // 10**9).clip(0, len(secs) - 1)
        return np.bincount(b, minlength=len(secs))

    def pct_per_sec(t: Any, lat: Any, q: float) -> list[float | None]:
        b = ((t - start) // 10**9).clip(0, len(secs) - 1)
        out: list[float | None] = []
        order = np.argsort(b, kind="stable")
        bs = b[order]
        ls = lat[order]
        edges = np.searchsorted(bs, np.arange(len(secs) + 1))
        for i in range(len(secs)):
            chunk = ls[edges[i] : edges[i + 1]]
            out.append(float(np.percentile(chunk, q)) if len(chunk) else None)
        return out

    return {
        "t": secs.tolist(),
        "offered": per_sec(ts).tolist(),
        "acked": per_sec(tsent).tolist(),
        "delivered": per_sec(tr).tolist() if len(tr) else [0] * len(secs),
        "s_p50": pct_per_sec(tsent, s_lat, 50),
        "s_p99": pct_per_sec(tsent, s_lat, 99),
        "d_p50": pct_per_sec(tr, d_lat, 50) if len(tr) else [],
        "d_p99": pct_per_sec(tr, d_lat, 99) if len(tr) else [],
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def format_table(rep: dict[str, Any]) -> str:
    lines = [f"== {rep['name']}: {rep['users']} users, {rep['duration_s']} s =="]
    th = rep["throughput"]
    lines.append(
        f"throughput: offered {_fmt(th['offered_rate'])} msg/s ({th['offered_msgs']:,} msgs), "
        f"achieved {_fmt(th['achieved_rate'])} msg/s ({th['acked_msgs']:,} acked, "
        f"{th['delivered_msgs']:,} delivered)"
    )
    hdr = (
        f"{'latency (ms)':52} {'count':>9} {'p50':>9} {'p90':>9} {'p99':>9} {'p99.9':>9} {'max':>9}"
    )
    lines.append(hdr)
    for leg, label in LEGS:
        s = rep["latency_ms"][leg]
        if not s.get("count"):
            continue
        lines.append(
            f"{label:52} {s['count']:>9,} {s['p50']:>9.2f} {s['p90']:>9.2f} {s['p99']:>9.2f} "
            f"{s['p99.9']:>9.2f} {s['max']:>9.2f}"
        )
    if rep["errors"]:
        lines.append("errors: " + ", ".join(f"{k} {v:,}" for k, v in rep["errors"].items()))
    else:
        lines.append("errors: none")
    t = rep["tester"]
    lines.append(
        f"tester: {t['procs']} proc(s), CPU {t['cpu_s']} s = {_fmt(t['cpu_us_per_msg'])} µs/msg, "
        f"busiest proc {t['busiest_proc_core_share']:.0%} of a core; "
        + (
            "saturated: YES - "
            + "; ".join(t["saturation"])
            + " (the server's figures are a lower bound)"
            if t["saturated"]
            else "saturated: no"
        )
    )
    srv = rep.get("server") or {}
    if srv:
        lines.append(
            "server: "
            + ", ".join(f"{k} {_fmt(v)}" for k, v in srv.items() if not isinstance(v, dict | list))
        )
    v = rep["verdict"]
    if v["ok"]:
        lines.append(
            f"verdict: OK - all {v['sent']:,} acknowledged messages delivered exactly once, "
            "in order, with their receipts"
        )
    else:
        lines.append(
            "verdict: FAILED - "
            + ", ".join(
                f"{k} {v[k]}"
                for k in (
                    "lost",
                    "duplicated",
                    "reordered",
                    "missing_receipt",
                    "unexpected",
                    "seq_conflicts",
                    "unacked",
                )
                if v[k]
            )
        )
        for k, ex in v["examples"].items():
            for e in ex[:5]:
                lines.append(f"  {k}: {json.dumps(e, default=str)}")
    return "\n".join(lines)


def write_charts(rep: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    series = rep.get("_series") or {}
    if not series:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    t = series["t"]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(t, series["offered"], label="offered (scheduled sends)")
    ax.plot(t, series["acked"], label="acknowledged (sent)")
    ax.plot(t, series["delivered"], label="delivered (msg)")
    paths.append(
        _save(
            plt,
            fig,
            ax,
            "messages / s",
            f"{rep['name']}: throughput",
            out_dir / f"{stem}-throughput.png",
        )
    )

    fig, ax = plt.subplots(figsize=(9, 4))
    for key, label in (
        ("s_p50", "S p50"),
        ("s_p99", "S p99"),
        ("d_p50", "delivery p50"),
        ("d_p99", "delivery p99"),
    ):
        ys = series.get(key) or []
        if ys:
            ax.plot(t[: len(ys)], [y if y is not None else float("nan") for y in ys], label=label)
    ax.set_yscale("log")
    paths.append(
        _save(
            plt,
            fig,
            ax,
            "latency (ms) from the scheduled time",
            f"{rep['name']}: latency",
            out_dir / f"{stem}-latency.png",
        )
    )
    return paths


def _save(plt: Any, fig: Any, ax: Any, ylabel: str, title: str, path: Path) -> Path:
    """Label a time-series chart (x: seconds), write it as PNG and free it."""
    ax.set_xlabel("seconds")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(
    rep: dict[str, Any], out_dir: str | Path, stem: str, charts: bool = True
) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = out / f"{stem}.json"
    p.write_text(json.dumps(rep, indent=2, default=str))
    (out / f"{stem}.txt").write_text(format_table(rep) + "\n")
    paths = [p]
    if charts:
        paths += write_charts(rep, out, stem)
    return paths
