"""`python -m loadtest.conns`: hellos and held connections on `chatd serve --workers 1` and
`--workers 2` (PostgreSQL and the machine's Redis, a prefix of its own): every connection
gets `welcome`, and no server process outlives its run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import pytest

from loadtest.conns import ConnsOptions, run_conns

REDIS = os.environ.get("CHATD_TEST_REDIS", "redis://127.0.0.1:6379/0")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_every_connection_is_welcomed_on_one_and_two_workers(
    tmp_path: Path, pg_admin_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    opt = ConnsOptions(
        workers=(1, 2),
        rounds=1,
        hellos=200,
        target=200,
        procs=2,
        inflight=8,
        hold_s=0.2,
        pg=pg_admin_url,
        redis=REDIS,
    )
    rows = run_conns(opt, tmp_path)
    assert [r["workers"] for r in rows] == [1, 2]
    for r in rows:
        hellos, hold = r["hellos"], r["hold"]
        assert hellos["welcomed"] == hellos["wanted"] == 200, hellos["errors"]
        assert hellos["errors"] == {} and hellos["rate"] > 0
        assert hold["welcomed"] == 200 and r["held"] == 200 and hold["lost"] == 0
        assert r["kib_per_conn"] is not None and r["server_cpu_per_1k"] > 0
        # with workers, the group is the supervisor and its workers: all were serving
        assert len(r["server_pids"]) == (1 if r["workers"] == 1 else 1 + r["workers"])
        assert r["server_alive_before_stop"] == r["server_pids"]
        if r["workers"] > 1:  # the kernel spread the held connections over both workers
            per_pid = hold["sample"]["fds_by_pid"]
            assert all(per_pid[str(pid)] > 50 for pid in r["server_pids"][1:]), per_pid
        assert r["server_left_running"] == []
        assert not [pid for pid in r["server_pids"] if _alive(pid)]
        assert r["ok"]
    saved = json.loads((tmp_path / "conns.json").read_text())
    assert [r["workers"] for r in saved["runs"]] == [1, 2]
    assert "hellos/s" in capsys.readouterr().out


def test_a_generator_process_must_fit_its_open_file_limit() -> None:
    with pytest.raises(ValueError, match="more --procs"):
        run_conns(ConnsOptions(target=10_000_000, procs=1))
