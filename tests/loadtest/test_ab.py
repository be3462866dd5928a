"""`loadtest ab`: builds from source trees, alternating, each run checked."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from loadtest.ab import parse_builds, run_ab
from loadtest.servers import start_chatd

ROOT = Path(__file__).resolve().parents[2]


def test_parse_builds_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="NAME=DIR"):
        parse_builds(["nodir"], [])
    with pytest.raises(ValueError, match="no chatd package"):
        parse_builds([f"x={tmp_path}"], [])
    with pytest.raises(ValueError, match="unknown builds"):
        parse_builds([f"a={ROOT}"], ["b=--gc-young 0"])
    with pytest.raises(ValueError, match="differ"):
        parse_builds([f"a={ROOT}", f"a={ROOT}"], [])
    (b,) = parse_builds([f"a={ROOT}"], ["a=--commit-window-ms 3 --gc-young 0"])
    assert b.tree == ROOT and b.extra == ["--commit-window-ms", "3", "--gc-young", "0"]


def test_two_builds_alternate_and_every_run_is_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    builds = parse_builds([f"one={ROOT}", f"two={ROOT}"], ["two=--commit-window-ms 0"])
    assert run_ab(builds, tmp_path, rate=40.0, duration=1.5, rounds=1, users=10) == 0
    runs = json.loads((tmp_path / "ab.json").read_text())["runs"]
    assert [r["build"] for r in runs] == ["one", "two"]
    assert all(r["ok"] and r["server_us_per_msg"] > 0 for r in runs)
    assert "server µs/msg" in capsys.readouterr().out


def test_the_relay_runs_beside_the_builds_in_every_round(tmp_path: Path) -> None:
    builds = parse_builds([f"one={ROOT}"], [], relay=True)
    assert [(b.name, b.tree) for b in builds] == [("one", ROOT), ("relay", None)]
    assert run_ab(builds, tmp_path, rate=40.0, duration=1.5, rounds=1, users=10) == 0
    runs = json.loads((tmp_path / "ab.json").read_text())["runs"]
    assert [r["build"] for r in runs] == ["one", "relay"]
    assert all(r["ok"] and r["server_us_per_msg"] > 0 for r in runs)


def test_a_server_starts_with_a_secret_that_looks_like_a_flag(tmp_path: Path) -> None:
    """token_urlsafe() secrets start with "-" one time in 64: the bench's server once
    took such a secret for a flag and did not start."""
    srv = start_chatd(tmp_path / "dash.db", "-" + "s" * 40)
    try:
        assert srv.url.startswith("ws://127.0.0.1:")
    finally:
        srv.stop()


def test_nodes_need_a_redis_broker() -> None:
    with pytest.raises(ValueError, match="NAME=N"):
        parse_builds([f"a={ROOT}"], [], nodes=["a=zero"])
    with pytest.raises(ValueError, match="needs --broker redis"):
        parse_builds([f"a={ROOT}"], [], nodes=["a=2"])
    with pytest.raises(ValueError, match="unknown builds"):
        parse_builds([f"a={ROOT}"], [], nodes=["b=2"])


def test_a_build_on_two_nodes_spans_them_and_counts_redis(tmp_path: Path, pg_url: str) -> None:
    """Two nodes of one build on a PostgreSQL database and the machine's Redis (a prefix
    of its own): every pair spans both, every message arrives once, in order."""
    extra = f"two=--db {pg_url} --broker redis://127.0.0.1:6379/0 --broker-prefix ab-{os.getpid()}:"
    builds = parse_builds([f"two={ROOT}"], [extra], nodes=["two=2"])
    assert builds[0].nodes == 2
    assert run_ab(builds, tmp_path, rate=40.0, duration=1.5, rounds=1, users=10) == 0
    (run,) = json.loads((tmp_path / "ab.json").read_text())["runs"]
    assert run["ok"] and run["nodes"] == 2 and run["redis_us_per_msg"] is not None
