"""`chatd top --once` against two live nodes (and one that is down)."""

from __future__ import annotations

import asyncio
import re

import pytest

from chatd.top import quantile, run_top

from .conftest import Clients, MakeConfig, Servers


async def test_top_once_shows_connections_per_node_and_in_total(
    servers: Servers,
    make_config: MakeConfig,
    clients: Clients,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a = await servers.start(make_config())
    b = await servers.start(make_config(db=make_config().db.replace("chatd.db", "b.db")))
    for user in ("alice", "bob"):
        await clients.connect(a, user)
    await clients.connect(b, "carol")
    urls = [f"http://127.0.0.1:{a.port}", f"127.0.0.1:{b.port}/metrics", "http://127.0.0.1:1"]
    assert await asyncio.to_thread(run_top, urls, 0.2, True) == 0
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if "│" in line}

    def cells(name: str) -> list[str]:
        return [c.strip() for c in rows[name].split("│")[1:-1]]

    assert cells(urls[0])[1:4] == ["up", "2", "2"]
    assert cells(urls[1])[1:4] == ["up", "1", "1"]
    assert cells(urls[2])[1] == "down"
    total = next(k for k in rows if re.match(r"total \(2/3 up\)", k))
    assert cells(total)[1:4] == ["up", "3", "3"]


def test_quantile_interpolates_within_buckets() -> None:
    cum = {0.01: 50.0, 0.1: 100.0, float("inf"): 100.0}
    assert quantile(0.5, cum) == pytest.approx(0.01)
    assert quantile(0.75, cum) == pytest.approx(0.055)
    assert quantile(0.5, {float("inf"): 0.0}) is None
