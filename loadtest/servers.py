"""Start and stop server subprocesses (chatd or the bare relay) on 127.0.0.1 for benches."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil  # type: ignore[import-untyped,unused-ignore]

__all__ = ["ServerProc", "start_chatd", "start_relay"]

_URL = re.compile(r"listening on (ws://\S+)")
BENCH_LIMITS = {
    "CHATD_SEND_RATE": "100000",
    "CHATD_SEND_BURST": "100000",
    "CHATD_TYPING_RATE": "1000",
    "CHATD_MAX_FRAME_RATE": "100000",
}
"""The bench's raised limits, as environment variables: a build that predates one of
them ignores it (a flag it does not know would stop it), so `ab` can run old trees."""


def _raise_nofile() -> None:
    """In the server, before exec: the most open files allowed, and SIGTERM when the
    load tester dies (Linux), so that no bench server outlives a crashed run."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ServerProc:
    """A server subprocess that printed its URL; we own it, and end it by its PID."""

    def __init__(
        self,
        argv: Sequence[str],
        timeout: float = 30.0,
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_raise_nofile,
            cwd=cwd,
            env=env,
        )
        self.url = ""
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = _URL.search(line)
            if m:
                self.url = m.group(1)
                break
        if not self.url:
            err = ""
            self.kill()
            if self.proc.stderr is not None:
                err = self.proc.stderr.read()[-2000:]
            raise RuntimeError(f"server did not start: {' '.join(self.argv)}\n{err}")
        self.ps = psutil.Process(self.proc.pid)
        # keep draining the pipes so that the server never blocks on a full pipe
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=_drain, args=(stream,), daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/", 1)[0])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _drain(stream: object) -> None:
    with contextlib.suppress(Exception):
        for _ in stream:  # type: ignore[attr-defined]
            pass


def _bin(name: str) -> str:
    cand = Path(sys.executable).with_name(name)
    return str(cand) if cand.exists() else name


def start_chatd(
    db_file: str | Path,
    secret: str,
    port: int = 0,
    extra: Sequence[str] = (),
    tree: Path | None = None,
) -> ServerProc:
    """`chatd serve` on 127.0.0.1 with the bench's raised limits. `tree`: run the chatd
    of that source tree instead of the installed one (its directory and PYTHONPATH:
    `python -m` puts the current directory first)."""
    program = [_bin("chatd")] if tree is None else [sys.executable, "-m", "chatd"]
    argv = [
        *program,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--db",
        f"sqlite:///{db_file}",
        f"--jwt-secret={secret}",  # one token: a secret may start with "-"
        "--log-level",
        "WARNING",
        *extra,
    ]
    env = {**os.environ, **BENCH_LIMITS}
    if tree is None:
        return ServerProc(argv, env=env)
    return ServerProc(argv, cwd=tree, env={**env, "PYTHONPATH": str(tree)})


def start_relay(port: int = 0) -> ServerProc:
    return ServerProc([sys.executable, "-m", "loadtest.relay", "--port", str(port)])
