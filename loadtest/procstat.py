"""CPU figures from /proc beside a run: the machine's busy share, and PostgreSQL's own CPU.

`MachineBusy` reads the `cpu` line of /proc/stat (every core): busy = not idle and
not iowait. `PostgresCpu` sums user+system time of the PostgreSQL processes that
work for one database: its backends (their command line names the database) and the
server's shared background processes (WAL writer, checkpointer, background writer,
...; they also work for the other databases of the server, so that part is an upper
bound). A backend that exits between two samples takes its time with it: sample
before the clients disconnect.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MachineBusy", "PostgresCpu"]

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_ticks(pid: str) -> int:
    """utime + stime of `pid` in clock ticks (fields 14 and 15 of /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


class PostgresCpu:
    """CPU seconds of the PostgreSQL processes working for database `dbname` since
    `start()` (backends that started meanwhile count from zero)."""

    def __init__(self, dbname: str) -> None:
        self.dbname = dbname
        self._start: dict[str, int] = {}

    def _sample(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if not cmd.startswith("postgres: "):
                    continue
                # "postgres: [CLUSTER: ]USER DB HOST(PORT) STATE" for a backend (Debian
                # names the cluster, "15/main:"): the database is the word before the host.
                words = cmd.split()
                host = next(
                    (i for i, w in enumerate(words) if w.endswith(")") or w == "[local]"), -1
                )
                if host > 0 and words[host - 1] != self.dbname:
                    continue
                out[proc.name] = _cpu_ticks(proc.name)
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
        return out

    def start(self) -> None:
        self._start = self._sample()

    def seconds(self) -> float:
        now = self._sample()
        ticks = sum(t - self._start.get(pid, 0) for pid, t in now.items())
        return ticks / _TICK


class MachineBusy:
    """The share of all cores' time spent busy since `start()` (0..1)."""

    def __init__(self) -> None:
        self._start = (0, 0)

    @staticmethod
    def _sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals) - idle, sum(vals)

    def start(self) -> None:
        self._start = self._sample()

    def share(self) -> float:
        busy, total = self._sample()
        b0, t0 = self._start
        return (busy - b0) / max(1, total - t0)
