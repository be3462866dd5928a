"""deploy/: the Grafana dashboard and the alert rules query only metrics that a live node
exports after traffic (a query of a metric that does not exist is a defect)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from protocol import Msg

from .conftest import Clients, MakeConfig, Servers
from .helpers import http_get

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
_NAME = re.compile(r"\b((?:chatd|process|python)_[a-z_]+)\b")
_PROMETHEUS_OWN = {"up"}


def _exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for v in node.values() for e in _exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


def test_dashboard_and_rules_load() -> None:
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    assert dash["panels"] and len(_exprs(dash)) >= 20
    titles = {p["title"] for p in dash["panels"]}
    assert {"Fleet", "Latency", "Delivery latency heatmap"} <= titles
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"ChatdNodeNotReady", "ChatdDeliveryP99High", "ChatdBrokerLag"} <= names
    assert {"ChatdStorageFailures", "ChatdOutboxNearLimit"} <= names
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["alerts.yml"]
    assert prom["scrape_configs"][0]["metrics_path"] == "/metrics"


async def test_every_queried_metric_is_exported_by_a_live_node(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    srv = await servers.start(make_config(node_id="n1"))
    alice = await clients.connect(srv, "alice")
    bob = await clients.connect(srv, "bob")
    await alice.send("bob", "hi")
    await bob.recv_type(Msg, timeout=5)
    status, text = await http_get(srv.port, "/metrics")
    assert status == 200
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    queried = {n for e in _exprs(dash) + _exprs(rules) for n in _NAME.findall(e)}
    assert len(queried) >= 25
    missing = sorted(queried - exported - _PROMETHEUS_OWN)
    assert not missing, f"queried but not exported: {missing}"


def test_compose_wires_prometheus_and_grafana_to_the_deploy_files() -> None:
    import yaml

    services = yaml.safe_load((DEPLOY.parent / "compose.yaml").read_text())["services"]
    mounts = [
        v.split(":")[0] for name in ("prometheus", "grafana") for v in services[name]["volumes"]
    ]
    for path in mounts:
        assert (DEPLOY.parent / path).is_file(), path
    assert "./deploy/alerts.yml" in mounts and "./deploy/grafana-dashboard.json" in mounts
    targets = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"][0]
    nodes = sorted(n for n in services if n.startswith("chatd"))
    assert targets["static_configs"][0]["targets"] == [f"{n}:8765" for n in nodes]
