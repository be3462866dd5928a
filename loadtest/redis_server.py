"""A redis-server of our own, for the benchmarks and tests that stop, stall, kill or
restart it (`loadtest.blink`, `loadtest.channels`, `loadtest.conns`, tests/).

Only this process's own server is ever signalled, by its PID; the machine's shared
Redis is never touched here. The server gets SIGTERM when the thread that started it
ends (PR_SET_PDEATHSIG), so that a crashed run leaves none behind: start and restart it
from a thread that outlives it (the main thread).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from .servers import _raise_nofile

__all__ = ["RedisServer", "free_port", "private_redis"]

_START_DEADLINE_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """`redis-server` on 127.0.0.1 on a port of its own, without persistence; its log
    is `redis-PORT.log` in `workdir`."""

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not on PATH")
        self._exe = exe
        self._dir = workdir
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self) -> None:
        """Start on `port` (a free one the first time: three tries, as a port may be
        taken between bind and start); return once it answers PING."""
        for attempt in range(3):
            fresh = self.port == 0
            if fresh:
                self.port = free_port()
            try:
                self._spawn()
                return
            except RuntimeError:
                self.stop()
                if not fresh or attempt == 2:
                    raise
                self.port = 0

    def _spawn(self) -> None:
        with open(self._dir / f"redis-{self.port}.log", "ab") as log:
            self._proc = subprocess.Popen(
                [
                    *(self._exe, "--port", str(self.port), "--bind", "127.0.0.1"),
                    *("--save", "", "--appendonly", "no", "--dir", str(self._dir)),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_raise_nofile,  # and PR_SET_PDEATHSIG
            )
        deadline = time.monotonic() + _START_DEADLINE_S
        while not _answers_ping(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.002)

    def stop(self) -> None:
        """SIGTERM our server (SIGCONT first if stalled) and wait for it to exit."""
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        if proc.poll() is None:
            if self._stopped:
                self.resume_pid(proc.pid)
            proc.send_signal(signal.SIGTERM)
            _wait(proc)

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send `sig` (SIGKILL, SIGTERM) and wait until the server has exited; `start`
        brings a new one up on the same port."""
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        os.kill(proc.pid, sig)
        _wait(proc)

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing."""
        os.kill(self.pid, signal.SIGSTOP)
        self._stopped = True

    def resume(self) -> None:
        self.resume_pid(self.pid)

    def resume_pid(self, pid: int) -> None:
        os.kill(pid, signal.SIGCONT)
        self._stopped = False


def _wait(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(timeout=_START_DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=_START_DEADLINE_S)


@contextlib.contextmanager
def private_redis(workdir: Path) -> Iterator[RedisServer]:
    """A started RedisServer in `workdir`, stopped on the way out."""
    server = RedisServer(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
