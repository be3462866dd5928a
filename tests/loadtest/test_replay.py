"""A short open-loop replay against a real in-process chatd finishes with nothing lost."""

from __future__ import annotations

from pathlib import Path

from chatd.config import Config
from chatd.server import Server
from loadtest.generate import GenParams, generate
from loadtest.report import build_report, format_table, write_report
from loadtest.runner import ReplayOptions, replay_inprocess

SECRET = "test-secret-0123456789abcdef0123456789"


async def test_short_replay_zero_lost(tmp_path: Path) -> None:
    cfg = Config(port=0, db=f"sqlite:///{tmp_path / 'chatd.db'}", jwt_secret=SECRET)
    trace = generate(
        GenParams(
            users=20,
            rate=40,
            duration=2.0,
            seed=5,
            connect_spread=0.3,
            offline_per_min=20,
            offline_median=0.3,
            storms=[(1.0, 0.3, 0.3)],
            read_delay_median=0.3,
            typing_lead=0.2,
            typing_prob=0.3,
        )
    )
    assert trace.count("disconnect") > 0
    async with Server(cfg) as server:
        url = f"ws://127.0.0.1:{server.port}/ws"
        raw = await replay_inprocess(
            trace, ReplayOptions(urls=[url], jwt_secret=SECRET, lead_in=0.2, drain_timeout=10)
        )
    rep = build_report(raw, name="short")
    v = rep["verdict"]
    assert v["ok"], format_table(rep)
    assert v["lost"] == 0 and v["duplicated"] == 0 and v["reordered"] == 0
    assert v["sent"] == trace.count("send")
    assert rep["latency_ms"]["reconnect_synced"]["count"] > 0
    paths = write_report(rep, tmp_path / "reports", "short")
    assert {p.suffix for p in paths} == {".json", ".png"}
