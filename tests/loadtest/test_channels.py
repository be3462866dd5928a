"""`python -m loadtest.channels`: both channel designs, on a redis-server of the module's
own (never the shared one), deliver every message in the steady phase, and chatd's per-user
channels lose nothing while users move."""

from __future__ import annotations

import json
from pathlib import Path

import psutil  # type: ignore[import-untyped,unused-ignore]
import pytest

from loadtest.channels import DESIGNS, main


def test_every_design_delivers_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "channels.json"
    argv = ["--nodes", "3", "--users", "300", "--two-devices", "0.2", "--rate", "1500"]
    argv += ["--duration", "0.6", "--storm", "0.2", "--idle", "0.1", "--churn", "40"]
    argv += ["--churn-duration", "0.4", "--json", str(out)]
    assert main(argv) == 0
    results = json.loads(out.read_text())["designs"]
    assert [r["design"] for r in results] == list(DESIGNS)
    for r in results:
        assert r["storm"]["sessions"] >= 300
        s = r["steady"]
        assert s["messages"] == 900
        assert s["owed"] > s["messages"]  # the second devices
        assert s["delivered"] == s["owed"]
        assert s["lost"] == s["moot"] == s["stray"] == s["unowed"] == 0
        assert s["redis_cpu_s"] > 0 and s["client_us_per_msg"] > 0
        assert not psutil.pid_exists(r["server"]["pid"])  # stopped by its PID
    churn = results[0]["churn"]
    assert churn["moves"] > 0 and churn["lost"] == 0  # user channels: none by construction
    text = capsys.readouterr().out
    assert "A user channels" in text and "redis µs/msg" in text
