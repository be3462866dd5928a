"""`chatd top URL [URL...]`: a live terminal view of the /metrics of one or more nodes.

Per node and in total: connections and users online, messages per second in (`send`
frames) and delivered (live `msg` frames), p50/p99 of send and delivery latency over
the last interval (from the histograms' bucket deltas), errors by code in the interval,
outbox depth and p99 broker lag. A node that does not answer shows as down.
"""

from __future__ import annotations

import math
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

__all__ = ["Snapshot", "quantile", "render", "run_top", "scrape"]

_HISTS = ("chatd_send_seconds", "chatd_delivery_seconds", "chatd_broker_lag_seconds")


@dataclass
class Snapshot:
    """What one scrape of one node says (summed over every label but `le` and `code`)."""

    at: float
    up: bool = True
    gauges: dict[str, float] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    buckets: dict[str, dict[float, float]] = field(default_factory=dict)
    """histogram name -> upper bound -> cumulative count."""
    errors: dict[str, float] = field(default_factory=dict)


def metrics_url(url: str) -> str:
    url = url if "://" in url else f"http://{url}"
    return url if url.rstrip("/").endswith("/metrics") else url.rstrip("/") + "/metrics"


def parse(text: str, at: float) -> Snapshot:
    snap = Snapshot(at)
    buckets: dict[str, dict[float, float]] = {h: defaultdict(float) for h in _HISTS}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith("_bucket") and s.name[: -len("_bucket")] in buckets:
                buckets[s.name[: -len("_bucket")]][float(s.labels["le"])] += s.value
            elif s.name == "chatd_errors_total":
                code = s.labels.get("code", "")
                snap.errors[code] = snap.errors.get(code, 0.0) + s.value
            elif s.name == "chatd_frames_in_total" and s.labels.get("type") == "send":
                snap.counters["sends"] = snap.counters.get("sends", 0.0) + s.value
            elif s.name in ("chatd_connections", "chatd_users_online", "chatd_outbox_frames"):
                snap.gauges[s.name] = snap.gauges.get(s.name, 0.0) + s.value
            elif s.name == "chatd_delivery_seconds_count":
                snap.counters["delivered"] = snap.counters.get("delivered", 0.0) + s.value
    snap.buckets = {k: dict(v) for k, v in buckets.items()}
    return snap


def scrape(url: str, timeout: float = 2.0) -> Snapshot:
    """One node's metrics now; `up` False when it does not answer."""
    now = time.monotonic()
    try:
        with urllib.request.urlopen(metrics_url(url), timeout=timeout) as resp:
            return parse(resp.read().decode(), now)
    except (OSError, ValueError):
        return Snapshot(now, up=False)


def quantile(q: float, cum: dict[float, float]) -> float | None:
    """The q-quantile of cumulative bucket counts (Prometheus' histogram_quantile:
    linear within the bucket; the largest finite bound past it); None when empty."""
    bounds = sorted(cum)
    total = cum.get(math.inf, 0.0)
    if total <= 0:
        return None
    rank = q * total
    lo, below = 0.0, 0.0
    for b in bounds:
        if cum[b] >= rank:
            if b == math.inf:
                return lo
            inside = cum[b] - below
            return lo + (b - lo) * ((rank - below) / inside if inside else 1.0)
        lo, below = b, cum[b]
    return lo


def _delta(new: dict[float, float], old: dict[float, float] | None) -> dict[float, float]:
    old = old or {}
    return {b: v - old.get(b, 0.0) for b, v in new.items()}


@dataclass
class Row:
    """One line of the view: a node over the last interval (or the total)."""

    name: str
    up: bool
    gauges: dict[str, float]
    rates: dict[str, float]
    hists: dict[str, dict[float, float]]
    errors: dict[str, float]


def interval(name: str, old: Snapshot, new: Snapshot) -> Row:
    if not (old.up and new.up):
        return Row(name, False, {}, {}, {}, {})
    dt = max(new.at - old.at, 1e-6)
    rates = {k: (v - old.counters.get(k, 0.0)) / dt for k, v in new.counters.items()}
    hists = {h: _delta(new.buckets.get(h, {}), old.buckets.get(h)) for h in _HISTS}
    errors = {c: v - old.errors.get(c, 0.0) for c, v in new.errors.items()}
    return Row(name, True, dict(new.gauges), rates, hists, errors)


def total(rows: Sequence[Row]) -> Row:
    up = [r for r in rows if r.up]
    out = Row(f"total ({len(up)}/{len(rows)} up)", bool(up), {}, {}, {}, {})
    for r in up:
        for part, acc in ((r.gauges, out.gauges), (r.rates, out.rates), (r.errors, out.errors)):
            for k, v in part.items():
                acc[k] = acc.get(k, 0.0) + v
        for h, cum in r.hists.items():
            into = out.hists.setdefault(h, {})
            for b, v in cum.items():
                into[b] = into.get(b, 0.0) + v
    return out


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def _cells(r: Row) -> list[str]:
    if not r.up:
        return [r.name, "[red]down[/red]", *["-"] * 9]
    g, h = r.gauges, r.hists
    errors = ", ".join(f"{c}={n:.0f}" for c, n in sorted(r.errors.items()) if n > 0) or "0"
    send, dlv, lag = (h.get(name, {}) for name in _HISTS)
    return [
        r.name,
        "[green]up[/green]",
        f"{g.get('chatd_connections', 0):.0f}",
        f"{g.get('chatd_users_online', 0):.0f}",
        f"{r.rates.get('sends', 0):.1f}",
        f"{r.rates.get('delivered', 0):.1f}",
        f"{_ms(quantile(0.5, send))} / {_ms(quantile(0.99, send))}",
        f"{_ms(quantile(0.5, dlv))} / {_ms(quantile(0.99, dlv))}",
        f"{g.get('chatd_outbox_frames', 0):.0f}",
        _ms(quantile(0.99, lag)),
        errors,
    ]


_COLUMNS = (
    "node", "state", "conns", "users", "msg in/s", "delivered/s", "send p50/p99 ms",
    "delivery p50/p99 ms", "outbox", "broker lag p99 ms", "errors",
)  # fmt: skip


def render(rows: Sequence[Row], every: float) -> Table:
    table = Table(title=f"chatd top (last {every:g} s)")
    for col in _COLUMNS:
        table.add_column(col, justify="left" if col in ("node", "state", "errors") else "right")
    for r in rows:
        table.add_row(*_cells(r))
    if len(rows) > 1:
        table.add_section()
        table.add_row(*_cells(total(rows)))
    return table


def _scrape_all(pool: ThreadPoolExecutor, urls: Iterable[str]) -> list[Snapshot]:
    return list(pool.map(scrape, urls))


def run_top(urls: Sequence[str], every: float = 1.0, once: bool = False) -> int:
    """Refresh every `every` seconds until Ctrl-C (`once`: print one frame and exit)."""
    console = Console()
    if not console.is_terminal:  # a pipe or a file: every column in full
        console = Console(width=200)
    with ThreadPoolExecutor(max_workers=min(len(urls), 16)) as pool:
        old = _scrape_all(pool, urls)
        if once:
            time.sleep(every)
            new = _scrape_all(pool, urls)
            rows = [interval(u, a, b) for u, a, b in zip(urls, old, new, strict=True)]
            console.print(render(rows, every))
            return 0
        try:
            with Live(console=console, auto_refresh=False) as live:
                while True:
                    time.sleep(every)
                    new = _scrape_all(pool, urls)
                    rows = [interval(u, a, b) for u, a, b in zip(urls, old, new, strict=True)]
                    live.update(render(rows, every), refresh=True)
                    old = new
        except KeyboardInterrupt:
            return 0
