"""/metrics after known traffic: counters and histogram counts move by exactly the
right amounts, every sample carries the node's label."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatd.client import RequestError
from chatd.server import Server
from protocol import Msg

from .conftest import Clients, MakeConfig, Servers
from .helpers import http_get

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(srv: Server) -> Samples:
    status, text = await http_get(srv.port, "/metrics")
    assert status == 200
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    labels.setdefault("node", "n1")
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_metrics_move_by_exactly_the_traffic(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    srv = await servers.start(make_config(node_id="n1", send_burst=3, send_rate=0.01))
    a1 = await clients.connect(srv, "alice", device="phone")
    a2 = await clients.connect(srv, "alice", device="laptop")
    bob = await clients.connect(srv, "bob")
    before = await scrape(srv)
    assert value(before, "chatd_connections") == 3
    assert value(before, "chatd_users_online") == 2
    assert value(before, "chatd_devices_per_user_count") == 2
    assert value(before, "chatd_devices_per_user_sum") == 3
    assert value(before, "chatd_devices_per_user_bucket", le="1") == 1
    assert value(before, "process_cpu_seconds_total") > 0

    for i in range(3):
        await a1.send("bob", f"m{i}")
    for c in (bob, a2):
        for _ in range(3):
            await c.recv_type(Msg, timeout=5)
    after = await scrape(srv)

    assert delta(before, after, "chatd_frames_in_total", type="send") == 3
    assert delta(before, after, "chatd_messages_stored_total") == 3
    assert delta(before, after, "chatd_send_seconds_count") == 3
    assert delta(before, after, "chatd_send_commit_seconds_count") == 3
    # each message: to bob's one device, and to alice's two (the sender's own gets `sent`)
    assert delta(before, after, "chatd_delivery_seconds_count") == 9
    assert delta(before, after, "chatd_broker_published_total") == 6
    assert delta(before, after, "chatd_broker_received_total") == 6
    assert delta(before, after, "chatd_broker_lag_seconds_count") == 6
    assert value(after, "chatd_broker_dropped_total") == 0
    assert value(after, "chatd_storage_batched_ops_total") >= 3
    # every committed transaction is timed: as many commits as batches
    batches = delta(before, after, "chatd_storage_batches_total")
    assert batches >= 1 and delta(before, after, "chatd_storage_commit_seconds_count") == batches
    assert value(after, "chatd_storage_retries_total") == 0
    assert value(after, "chatd_storage_batch_failures_total", kind="unavailable") == 0
    assert value(after, "chatd_outbox_frames") == 0
    assert value(after, "chatd_outbox_limit") == 2000


async def test_metrics_count_refusals_resumes_and_replays(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    srv = await servers.start(make_config(node_id="n1", send_burst=2, send_rate=0.01))
    alice = await clients.connect(srv, "alice")
    bob = await clients.connect(srv, "bob")
    await bob.close()
    before = await scrape(srv)
    for i in range(2):
        await alice.send("bob", f"m{i}")
    raw = await clients.raw(srv)
    refused = await raw.hello("not-a-token")
    assert refused["t"] == "error"
    await raw.closed.wait()
    bob2 = await clients.connect(srv, "bob", since=0)  # bob had no events
    for _ in range(2):
        await bob2.recv_type(Msg, timeout=5)
    after = await scrape(srv)

    assert delta(before, after, "chatd_resumes_total") == 1
    assert delta(before, after, "chatd_replayed_events_total", kind="resume") == 2
    assert delta(before, after, "chatd_hello_failures_total", reason="unauthorized") == 1
    assert delta(before, after, "chatd_errors_total", code="unauthorized") == 1
    assert delta(before, after, "chatd_closes_total", code="1008", reason="unauthorized") == 1
    assert delta(before, after, "chatd_delivery_seconds_count") == 2  # alice's own only

    with pytest.raises(RequestError):  # the burst of 2 is spent
        await alice.send("bob", "over", retries=0)
    limited = await scrape(srv)
    assert delta(after, limited, "chatd_rate_limited_total", what="send") == 1
    assert delta(after, limited, "chatd_errors_total", code="rate_limited") == 1
