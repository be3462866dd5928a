"""`chatd serve --workers 2`: two processes on one port, joined by Redis, one signal stops
them all, and a worker that dies is restarted."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import psutil
import pytest

from .helpers import RawConn, is_t

ROOT = Path(__file__).resolve().parents[2]
SECRET = "workers-test-" + "s" * 40
_DEADLINE = 30.0


def _token(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 600}, SECRET, algorithm="HS256")


class _Supervisor:
    """The parent process, with its stdout and stderr read line by line."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chatd", "serve", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, pattern: str, count: int = 1) -> list[re.Match[str]]:
        """The first `count` lines matching `pattern` (waits for them, bounded)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + _DEADLINE
        with self._cond:
            while True:
                found = [m for m in map(rx.search, self.lines) if m]
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no {count} x {pattern!r} in:\n" + "\n".join(self.lines))
                self._cond.wait(left)


@pytest.fixture
def supervisor(pg_url: str) -> Iterator[_Supervisor]:
    prefix = f"chatd-workers-{secrets.token_hex(4)}:"
    sup = _Supervisor(
        [
            *("--workers", "2", "--port", "0", "--db", pg_url),
            *("--broker", "redis://127.0.0.1:6379/0", "--broker-prefix", prefix),
            f"--jwt-secret={SECRET}",
        ]
    )
    try:
        yield sup
    finally:
        if sup.proc.poll() is None:  # our own process, by its handle: its workers too
            sup.proc.send_signal(signal.SIGTERM)
            try:
                sup.proc.wait(timeout=_DEADLINE)
            except subprocess.TimeoutExpired:
                sup.proc.kill()  # the workers die with it (PR_SET_PDEATHSIG)
                sup.proc.wait(timeout=_DEADLINE)


def _worker_pids(sup: _Supervisor, count: int) -> list[int]:
    return [int(m.group(1)) for m in sup.wait_for(r"worker \d+ .* started, pid (\d+)", count)]


async def test_two_workers_share_a_port_and_stop_on_one_signal(supervisor: _Supervisor) -> None:
    (m,) = supervisor.wait_for(r"chatd: 2 workers on (ws://\S+)")
    url = m.group(1)
    pids = _worker_pids(supervisor, 2)
    supervisor.wait_for(r"chatd listening on", 2)
    conns = [await RawConn.open(url) for _ in range(20)]
    try:
        for i, c in enumerate(conns):
            assert (await c.hello(_token(f"user{i}")))["t"] == "welcome"
        held = [
            sum(1 for s in psutil.Process(pid).net_connections() if s.status == "ESTABLISHED")
            for pid in pids
        ]
        assert all(n > 0 for n in held), held  # the kernel spread them over both
        await conns[0].request({"t": "send", "id": 1, "to": "user1", "cmid": "c", "body": "x"})
        msg = await conns[1].next(is_t("msg"))
        assert msg["from"] == "user0"
    finally:
        for c in conns:
            await c.close()
    supervisor.proc.send_signal(signal.SIGTERM)
    assert supervisor.proc.wait(timeout=_DEADLINE) == 0
    assert not any(psutil.pid_exists(pid) and _alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_a_worker_that_dies_is_restarted(supervisor: _Supervisor) -> None:
    (m,) = supervisor.wait_for(r"chatd: 2 workers on (ws://\S+)")
    first = _worker_pids(supervisor, 2)
    supervisor.wait_for(r"chatd listening on", 2)
    os.kill(first[0], signal.SIGKILL)  # a worker this test's supervisor started
    supervisor.wait_for(r"exited with -9: restarting it")
    pids = _worker_pids(supervisor, 3)
    assert pids[2] not in first
    supervisor.wait_for(r"chatd listening on", 3)
    c = await RawConn.open(m.group(1))
    try:
        assert (await c.hello(_token("after")))["t"] == "welcome"
    finally:
        await c.close()


def test_workers_die_with_a_killed_supervisor(supervisor: _Supervisor) -> None:
    supervisor.wait_for(r"chatd: 2 workers on")
    workers = [psutil.Process(pid) for pid in _worker_pids(supervisor, 2)]
    supervisor.wait_for(r"chatd listening on", 2)
    supervisor.proc.kill()  # SIGKILL: it cannot pass anything on
    supervisor.proc.wait(timeout=_DEADLINE)
    _gone, alive = psutil.wait_procs(workers, timeout=_DEADLINE)
    assert alive == [], "a worker outlived its supervisor"
