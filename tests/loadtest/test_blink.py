"""`loadtest.blink`: two nodes on a fresh PostgreSQL database and a redis-server of the
test's own, which is SIGKILLed and started again on its port while the load runs; every
acknowledged message arrives exactly once, in order, and the chart is drawn. The
analysis is checked on made-up messages too."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest

from loadtest.blink import BlinkOptions, Msg, Timeline, analyze, run_blink, with_control


def _msgs(start: float, end: float, lat: float, step: float = 0.01, first: int = 0) -> list[Msg]:
    n = round((end - start) / step)
    out = []
    for i in range(n):
        t = start + i * step
        out.append(Msg(send=t, s_ms=1.0, recv=t + lat, key=(0, str(first + i)), to=1))
    return out


def test_the_analysis_of_a_made_up_outage() -> None:
    """5 ms before; everything sent while Redis is down arrives 0.5 s after it is back;
    50 ms for the first second after, 5 ms again from then on."""
    tl = Timeline(down=10.0, up=13.0)
    down = [
        Msg(t, 1.0, 13.5, (0, f"d{i}"), 1) for i, t in enumerate(x / 100 for x in range(1000, 1300))
    ]
    msgs = [*_msgs(0.0, 10.0, 0.005), *down]
    msgs += _msgs(13.0, 14.0, 0.05, first=10_000) + _msgs(14.0, 20.0, 0.005, first=20_000)
    a = analyze(msgs, tl, duration=20.0, bucket=0.25, window=1.0)
    assert a["pre_p99_ms"] == pytest.approx(5.0)
    assert a["last_sent_while_down"]["after_up_s"] == pytest.approx(0.5)
    assert a["last_sent_before_up"]["after_up_s"] == pytest.approx(0.5)
    assert a["p99_back_after_up_s"] == pytest.approx(1.0)
    assert a["p99_settled_after_up_s"] == pytest.approx(1.0)
    assert a["phases"]["down"]["send_msg_ms"]["max"] == pytest.approx(3500.0)
    assert len(a["buckets"]) == 80 and a["buckets"][0]["sends"] == 25


def test_a_lost_message_is_never_delivered() -> None:
    tl = Timeline(down=1.0, up=2.0)
    msgs = _msgs(0.0, 3.0, 0.005)
    msgs[150].recv = None
    a = analyze(msgs, tl, duration=3.0, bucket=0.5)
    assert a["last_sent_while_down"]["after_up_s"] is None
    assert math.isinf(a["phases"]["down"]["send_msg_ms"]["max"])
    assert a["buckets"][3]["lost"] == 1


def test_the_comparison_with_a_control_run() -> None:
    """Back within the control's highest per-second p99 after the window (400 ms) from
    the second that starts 2 s after Redis returned on."""

    def res(p99s: list[float]) -> dict[str, object]:
        rows = [{"t": t, "d_p99": p} for t, p in enumerate(p99s)]
        return {
            "options": {"rate": 1.0, "users": 2, "duration": 8.0, "bucket": 1.0, "seed": 7},
            "timeline": {"down": 2.0, "up": 4.0},
            "messages_by_second": rows,
            "analysis": {"buckets": [{"t": r["t"], "d_p99": r["d_p99"]} for r in rows]},
        }

    mine = res([100, 100, 3000, 3000, 2000, 900, 300, 390])
    control = res([900, 200, 200, 200, 200, 400, 300, 250])
    with_control(mine, control, "ctl.json")
    ctl = mine["control"]
    assert isinstance(ctl, dict)
    assert ctl["same_load"] and ctl["envelope_p99_ms"] == 400
    assert ctl["like_control_after_up_s"] == pytest.approx(2.0)


@pytest.mark.skipif(
    shutil.which("redis-server") is None and not os.environ.get("CHATD_TEST_REQUIRE_SERVICES"),
    reason="redis-server is not installed",
)
@pytest.mark.timeout(90)
def test_a_redis_kill_loses_nothing_and_draws_the_chart(tmp_path: Path, pg_admin_url: str) -> None:
    opt = BlinkOptions(
        duration=8.0,
        rate=200.0,
        users=40,
        at=3.0,
        downtime=1.0,
        how="kill",
        pg_admin=pg_admin_url,
        out=tmp_path,
        chart=tmp_path / "chart.svg",
        drain_timeout=15.0,
    )
    res = run_blink(opt)
    v = res["verdict"]
    assert (v["lost"], v["duplicated"], v["reordered"], v["unacked"]) == (0, 0, 0, 0), v
    assert v["ok"] and v["sent"] > 1000, v
    tl = res["timeline"]
    assert 0.95 < tl["up"] - tl["down"] < 2.0
    assert all(m["chatd_broker_reconnects"] >= 1 for m in res["node_metrics"].values())
    assert res["analysis"]["last_sent_while_down"]["after_up_s"] is not None
    chart = (tmp_path / "chart.svg").read_text()
    assert "<svg" in chart
    assert (tmp_path / "blink.json").is_file() and (tmp_path / "n1.log").is_file()
