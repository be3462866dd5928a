"""`chatd serve --workers N`: N processes on one port (SO_REUSEPORT), joined by the Redis
broker like any other nodes. Python runs one core per process, so this is how one
machine uses all its cores, and holds more connections than one process's open-file
limit allows.

The parent serves nothing: it applies the migrations once (workers start with
`--migrate false`, so that they do not race), then starts each worker as `chatd serve`
with `--workers 1`,
`--reuse-port` and a node id of its own (`NODE-wN`), restarts one that dies (logged),
and on SIGTERM or SIGINT passes the signal on and waits for all of them (a second
signal kills them at once).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from .config import Config

log = logging.getLogger("chatd.workers")

__all__ = ["run_workers"]

_PR_SET_PDEATHSIG = 1
_RESTART_PAUSE = 1.0
"""Seconds between two starts of one worker (a worker that dies at once is not spun)."""


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _Group:
    def __init__(self, config: Config, argv: Sequence[str]) -> None:
        self.config = config
        self.port = config.port or _free_port(config.host)
        self.argv = list(argv)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.started: dict[int, float] = {}
        self.stopping = 0
        """Signals received: 1 passes SIGTERM on, 2 kills."""

    def spawn(self, i: int) -> None:
        node = f"{self.config.node}-w{i}"
        cmd = [
            *(sys.executable, "-m", "chatd", "serve", *self.argv),
            *("--workers", "1", "--reuse-port", "true", "--port", str(self.port)),
            *("--node-id", node, "--migrate", "false"),
        ]
        proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent)
        self.procs[i] = proc
        self.started[i] = time.monotonic()
        log.info("worker %d (node %s) started, pid %d", i, node, proc.pid)

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping += 1
        sig = signal.SIGTERM if self.stopping == 1 else signal.SIGKILL
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(sig)

    def supervise(self) -> int:
        while True:
            for i, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                if self.stopping:
                    del self.procs[i]
                    continue
                log.warning("worker %d (pid %d) exited with %s: restarting it", i, proc.pid, code)
                wait = self.started[i] + _RESTART_PAUSE - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self.spawn(i)
            if self.stopping and not self.procs:
                return 0
            time.sleep(0.1)


def run_workers(config: Config, argv: Sequence[str]) -> int:
    """Run `config.workers` worker processes of `chatd serve argv` until a signal."""
    if config.migrate:
        from storage.migrate import upgrade

        upgrade(config.db_url)
    group = _Group(config, _without_port(argv))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, group.on_signal)
    for i in range(1, config.workers + 1):
        group.spawn(i)
    print(
        f"chatd: {config.workers} workers on ws://{config.host}:{group.port}/ws",
        flush=True,
    )
    log.info("pid %d supervises %d workers", os.getpid(), config.workers)
    return group.supervise()


def _die_with_parent() -> None:
    """In the worker, before exec: SIGTERM when the supervisor dies, however it dies
    (Linux), so that no worker outlives its group."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _without_port(argv: Sequence[str]) -> list[str]:
    """`argv` without --port, --workers, --node-id (the parent sets them per worker)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--port", "--workers", "--node-id", "--reuse-port", "--migrate"):
            skip = "=" not in arg
            continue
        out.append(arg)
    return out
