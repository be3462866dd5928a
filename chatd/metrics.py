"""Prometheus metrics of one chatd process (served at /metrics)."""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from storage.base import Store

__all__ = ["Metrics"]


class Metrics:
    """All metrics of one server, in their own registry (tests run many servers)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.connections = Gauge("chatd_connections", "Open WebSocket connections", registry=r)
        self.sessions = Gauge("chatd_sessions", "Authenticated sessions", registry=r)
        self.frames_in = Counter(
            "chatd_frames_in", "Client frames received, by type", ["type"], registry=r
        )
        self.errors = Counter("chatd_errors", "Error frames sent, by code", ["code"], registry=r)
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
            "too_many_bad_frames, too_many_frames, stream_gap, internal_error)",
            ["code", "reason"],
            registry=r,
        )
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

    def watch_store(self, store: Store) -> None:
        """Export the store's group-commit counters, read at scrape time."""
        self.registry.register(_StoreCollector(store))

    def frame_in(self, t: str) -> None:
        """Count a client frame (labelled children resolved once: this runs per frame)."""
        child = self._frames_in_by_type.get(t)
        if child is None:
            child = self.frames_in.labels(t)
        child.inc()


class _StoreCollector(Collector):
    """Read at scrape time: the store counts its batches itself (on its writer)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        stats = self._store.stats()
        ops, sizes = stats.batched_ops, stats.batch_sizes
        txs = stats.batches
        yield CounterMetricFamily(
            "chatd_storage_batches", "Group-commit transactions committed", value=txs
        )
        yield CounterMetricFamily(
            "chatd_storage_batched_ops", "Writes (sends and marks) in those transactions", value=ops
        )
        buckets: list[tuple[str, float]] = []
        seen = 0
        for bound, n in zip((*stats.batch_bounds, math.inf), sizes, strict=True):
            seen += n
            buckets.append(("+Inf" if bound == math.inf else str(bound), seen))
        yield HistogramMetricFamily(
            "chatd_storage_batch_ops",
            "Writes per group-commit transaction (tune --commit-window-ms with it)",
            buckets=buckets,
            sum_value=ops,
        )
