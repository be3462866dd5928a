"""Prometheus metrics of one chatd process (served at /metrics; docs/metrics.md).

Cost: the hot path (a frame, a send, a delivery) only adds to plain ints and to the
buckets of `Buckets` (a list of ints); collectors turn them into metrics at scrape
time. prometheus-client objects are called per connection or on rare paths only,
with their labelled children resolved once.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from protocol import ErrorCode
from storage.base import Store

from .broker import Broker
from .limits import FleetLimits

__all__ = ["LATENCY_BOUNDS", "Buckets", "Metrics", "NodeRegistry"]

LATENCY_BOUNDS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
"""Bucket bounds (seconds) of the latency histograms."""
DEVICE_BOUNDS = (1, 2, 3, 4, 6, 8, 10)
"""Bucket bounds of the devices-per-user histogram."""
HELLO_FAILURES = (
    "unauthorized",
    "no_hello_in_time",
    "too_many_bad_frames",
    "too_many_connections",
    "broker_unavailable",
    "storage_unavailable",
)
RATE_LIMITED = ("send", "typing", "mark", "connections")
STORAGE_FAILURES = ("unavailable", "rejected")


class Buckets:
    """A histogram in plain ints: `observe` costs a bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        """counts[i]: observations v with bounds[i-1] < v <= bounds[i]; the last: above all."""
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.bounds, v)] += 1
        self.sum += v

    def observe_n(self, v: float, n: int) -> None:
        self.counts[bisect_left(self.bounds, v)] += n
        self.sum += v * n

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        return _histogram(name, doc, self.bounds, self.counts, self.sum)


def _histogram(
    name: str, doc: str, bounds: Iterable[float], counts: Iterable[int], total: float
) -> HistogramMetricFamily:
    buckets: list[tuple[str, float]] = []
    seen = 0
    for bound, n in zip((*bounds, math.inf), counts, strict=True):
        seen += n
        buckets.append(("+Inf" if bound == math.inf else str(bound), seen))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)


class NodeRegistry:
    """A registry's metrics with a constant `node` label on every sample (added at
    scrape time: the metrics themselves are unlabelled by node)."""

    def __init__(self, inner: CollectorRegistry, node: str) -> None:
        self.inner = inner
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        for metric in self.inner.collect():
            if node:
                metric.samples = [
                    s._replace(labels={**s.labels, "node": node}) for s in metric.samples
                ]
            yield metric


class HubView(Protocol):
    """What the metrics read from the hub at scrape time."""

    msg_pushes: int

    def users_online(self) -> int: ...

    def device_counts(self) -> Iterable[int]: ...


class _Scrape(Collector):
    """Runs `collect` at scrape time."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


class Metrics:
    """All metrics of one server, in their own registry (tests run many servers)."""

    def __init__(self, node: str = "") -> None:
        r = self._inner = CollectorRegistry()
        self.registry = NodeRegistry(r, node)
        for c in (PROCESS_COLLECTOR, GC_COLLECTOR, PLATFORM_COLLECTOR):
            if c is not None:
                r.register(c)
        self.connections = Gauge("chatd_connections", "Open WebSocket connections", registry=r)
        self.sessions = Gauge("chatd_sessions", "Authenticated sessions", registry=r)
        self.draining = Gauge(
            "chatd_draining", "1 while the node drains (/readyz answers 503)", registry=r
        )
        self.frames_in = Counter(
            "chatd_frames_in", "Client frames received, by type", ["type"], registry=r
        )
        self.errors = Counter("chatd_errors", "Error frames sent, by code", ["code"], registry=r)
        for code in ErrorCode:
            self.errors.labels(code)  # every code exported at 0 (dashboards, alerts)
        self.messages = Counter(
            "chatd_messages_stored", "Messages stored (not counting duplicates)", registry=r
        )
        self.duplicates = Counter(
            "chatd_messages_duplicate", "Sends answered as duplicates", registry=r
        )
        self.receipts = Counter(
            "chatd_receipts_stored", "Watermark moves stored, by kind", ["kind"], registry=r
        )
        self.closes = Counter(
            "chatd_closes",
            "Connections closed by the server, by close code and reason (slow_reader, "
            "too_many_connections, storage_unavailable, unauthorized, no_hello_in_time, "
            "too_many_bad_frames, too_many_frames, stream_gap, internal_error, going_away)",
            ["code", "reason"],
            registry=r,
        )
        self.closes.labels("1013", "slow_reader")  # exported at 0 (an alert watches it)
        self._init_budget(r)
        self.gap_fills = Counter(
            "chatd_gap_fills", "Events read back from storage to fill a cursor gap", registry=r
        )
        self._frames_in_by_type = {
            t: self.frames_in.labels(t)
            for t in ("hello", "send", "delivered", "read", "typing", "history", "convs", "ping")
        }
        self.commit_seconds = Histogram(
            "chatd_send_commit_seconds",
            "Time from a send frame to its durable commit",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self._init_plain()
        r.register(_Scrape(self._collect_plain))

    def _init_budget(self, r: CollectorRegistry) -> None:
        """The connection budget's metrics (admission)."""
        self.shed = Counter(
            "chatd_connections_shed",
            "Connections closed before hello to make room in the connection budget, by "
            "stage (upgrade: in the WebSocket handshake; hello: upgraded, no hello yet)",
            ["stage"],
            registry=r,
        )
        self.pending = Gauge(
            "chatd_connections_pending", "Connections that have not said hello", registry=r
        )
        self.open_sockets = Gauge(
            "chatd_connections_open", "TCP connections held (budgeted), any stage", registry=r
        )
        self.budget = Gauge(
            "chatd_connection_budget",
            "Connections held at most, by kind (all; pending: before hello)",
            ["kind"],
            registry=r,
        )

    def _init_plain(self) -> None:
        """The counters of the hot path: plain ints, exported by `_collect_plain`."""
        self.send_seconds = Buckets(LATENCY_BOUNDS)
        """send frame read -> its `sent` handed to the connection."""
        self.delivery_seconds = Buckets(LATENCY_BOUNDS)
        """commit (publish) -> a live `msg` handed to a connection of its user."""
        self.broker_lag = Buckets(LATENCY_BOUNDS)
        """publish -> the event received by this node's broker."""
        self.resumes = 0
        self.replayed = {"resume": 0, "undelivered": 0}
        self.gap_repairs = 0
        self.hello_failures = dict.fromkeys(HELLO_FAILURES, 0)
        self.rate_limited = dict.fromkeys(RATE_LIMITED, 0)
        self.storage_failures = dict.fromkeys(STORAGE_FAILURES, 0)
        self.published_at = 0.0
        """Wall clock of the last publish (the in-process broker's lag stamp)."""
        self._hub: HubView | None = None

    # ------------------------------------------------------------------ hot path

    def frame_in(self, t: str) -> None:
        """Count a client frame (labelled children resolved once: this runs per frame)."""
        child = self._frames_in_by_type.get(t)
        if child is None:
            child = self.frames_in.labels(t)
        child.inc()

    def hello_failed(self, reason: str) -> None:
        key = reason.replace(" ", "_")
        self.hello_failures[key] = self.hello_failures.get(key, 0) + 1

    def on_lag(self, lag: float) -> None:
        """The broker handed the hub an event published `lag` seconds ago (by wall
        clock): the `msg` frames the hub just handed to connections are that old."""
        self.broker_lag.observe(lag)
        hub = self._hub
        if hub is not None and hub.msg_pushes:
            self.delivery_seconds.observe_n(lag, hub.msg_pushes)
            hub.msg_pushes = 0

    # ------------------------------------------------------------------ sources

    def watch_store(self, store: Store) -> None:
        """Export the store's group-commit counters, read at scrape time."""
        self._inner.register(_StoreCollector(store))

    def watch_broker(self, broker: Broker) -> None:
        """Export the broker's counters (`Broker.stats()`), read at scrape time."""
        self._inner.register(_Scrape(lambda: _broker_metrics(broker)))

    def watch_limits(self, limits: FleetLimits) -> None:
        """Export the fleet limits' counters (`FleetLimits.stats()`), read at scrape time."""
        self._inner.register(_Scrape(lambda: _limits_metrics(limits)))

    def watch_hub(self, hub: HubView, outbox: Callable[[], tuple[int, int]], limit: int) -> None:
        """Export users online, devices per user and outbox depths (`outbox()`: frames
        queued for all connections, and for the fullest one) at scrape time."""
        self._hub = hub
        self._inner.register(_Scrape(lambda: _hub_metrics(hub, outbox, limit)))

    def _collect_plain(self) -> Iterator[Metric]:
        yield self.send_seconds.family(
            "chatd_send_seconds", "send frame read to its sent handed to the socket"
        )
        yield self.delivery_seconds.family(
            "chatd_delivery_seconds", "commit to a live msg handed to a connection of its user"
        )
        yield self.broker_lag.family(
            "chatd_broker_lag_seconds", "publish (any node) to receipt by this node's broker"
        )
        yield CounterMetricFamily(
            "chatd_resumes", "hellos with since (a device resuming)", value=self.resumes
        )
        yield _labelled(
            "chatd_replayed_events",
            "Stored events written on hello, by kind (resume: after since; undelivered)",
            "kind",
            self.replayed,
        )
        yield CounterMetricFamily(
            "chatd_gap_repairs", "Cursor gaps repaired from storage", value=self.gap_repairs
        )
        yield _labelled(
            "chatd_hello_failures",
            "Connections refused before welcome",
            "reason",
            self.hello_failures,
        )
        yield _labelled(
            "chatd_rate_limited", "Requests refused by a rate limit", "what", self.rate_limited
        )
        yield _labelled(
            "chatd_storage_failures",
            "Writes that failed in storage, by kind (unavailable: retry; rejected: a fault)",
            "kind",
            self.storage_failures,
        )


def _labelled(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, doc, labels=[label])
    for key, n in values.items():
        fam.add_metric([key], n)
    return fam


def _broker_metrics(broker: Broker) -> Iterator[Metric]:
    s = broker.stats()
    for name, doc, value in (
        ("published", "Events handed on by this node's broker", s.published),
        ("received", "Events received by this node's broker", s.received),
        ("dropped", "Events never handed on (storage has them)", s.dropped),
        ("reconnects", "Broker connections lost and made again", s.reconnects),
        ("resyncs", "Position checks after a possible loss", s.resyncs),
    ):
        yield CounterMetricFamily(f"chatd_broker_{name}", doc, value=value)
    yield GaugeMetricFamily("chatd_broker_queued", "Events waiting to be published", s.queued)
    yield GaugeMetricFamily("chatd_broker_channels", "Users subscribed on this node", s.channels)


def _limits_metrics(limits: FleetLimits) -> Iterator[Metric]:
    s = limits.stats()
    yield GaugeMetricFamily(
        "chatd_fleet_limits_up", "1: the fleet's limits answer; 0: this node's apply", s.up
    )
    yield GaugeMetricFamily(
        "chatd_fleet_limits_solo_users",
        "Users whose connections are all on this node: checked here, no round trip",
        s.solo,
    )
    checks = CounterMetricFamily(
        "chatd_fleet_limit_checks",
        "Rate and connection checks of the fleet limits, by result",
        labels=["result"],
    )
    for result, value in (
        ("allowed", s.allowed),
        ("refused", s.refused),
        ("unanswered", s.unanswered),
    ):
        checks.add_metric([result], value)
    yield checks
    yield CounterMetricFamily(
        "chatd_fleet_limits_reconnects", "Fleet limit connections lost", value=s.reconnects
    )


def _hub_metrics(
    hub: HubView, outbox: Callable[[], tuple[int, int]], limit: int
) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "chatd_users_online", "Users with a session on this node", hub.users_online()
    )
    counts = [0] * (len(DEVICE_BOUNDS) + 1)
    total = 0
    for n in hub.device_counts():
        counts[bisect_left(DEVICE_BOUNDS, n)] += 1
        total += n
    yield _histogram(
        "chatd_devices_per_user", "Sessions per online user", DEVICE_BOUNDS, counts, total
    )
    frames, fullest = outbox()
    yield GaugeMetricFamily("chatd_outbox_frames", "Frames queued for all connections", frames)
    yield GaugeMetricFamily(
        "chatd_outbox_frames_max", "Frames queued for the fullest connection", fullest
    )
    yield GaugeMetricFamily(
        "chatd_outbox_limit", "Frames queued for one connection before close 1013", limit
    )


class _StoreCollector(Collector):
    """Read at scrape time: the store counts its batches itself (on its writer)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        stats = self._store.stats()
        ops = stats.batched_ops
        yield CounterMetricFamily(
            "chatd_storage_batches", "Group-commit transactions committed", value=stats.batches
        )
        yield CounterMetricFamily(
            "chatd_storage_batched_ops", "Writes (sends and marks) in those transactions", value=ops
        )
        yield _histogram(
            "chatd_storage_batch_ops",
            "Writes per group-commit transaction (tune --commit-window-ms with it)",
            stats.batch_bounds,
            stats.batch_sizes,
            ops,
        )
        yield _histogram(
            "chatd_storage_commit_seconds",
            "Time of one group commit (a transaction of writes), retries included",
            stats.commit_bounds,
            stats.commit_counts,
            stats.commit_seconds,
        )
        yield CounterMetricFamily(
            "chatd_storage_retries",
            "Transactions tried again (deadlock, serialization failure, lost unique race)",
            value=stats.retries,
        )
        yield CounterMetricFamily(
            "chatd_storage_locked_batches",
            "PostgreSQL batches done the locked way at once (recent checked writes conflicted)",
            value=stats.locked,
        )
        yield CounterMetricFamily(
            "chatd_storage_conflicts",
            "PostgreSQL batches planned on rows another commit moved: done again, locked",
            value=stats.conflicts,
        )
        failed = CounterMetricFamily(
            "chatd_storage_batch_failures",
            "Failed transactions by kind (unavailable: nothing stored; rejected: a value)",
            labels=["kind"],
        )
        for kind, n in stats.failures:
            failed.add_metric([kind], n)
        yield failed
