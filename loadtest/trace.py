"""The trace format: JSON Lines (optionally gzipped), one header line, then timed events.

Header: ``{"format": "chatd-trace", "version": 1, "users": [...], "duration": s, "meta": {...}}``
Event:  ``{"t": seconds, "u": user, "e": kind, ...}``; kinds and their fields:

- ``connect`` — open a connection (resumes with ``since`` once the device has a cursor)
- ``disconnect`` — close it
- ``send`` — ``to`` (user), ``size`` (body bytes)
- ``delivered`` / ``read`` — ``with`` (user): mark up to the newest message received from them
- ``typing`` — ``to`` (user), ``on`` (bool)
- ``history`` — ``with`` (user), ``limit`` (int, optional)

No message contents. Events are sorted by ``t``. See README.md.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

__all__ = [
    "FORMAT",
    "KINDS",
    "VERSION",
    "Trace",
    "TraceError",
    "TraceEvent",
    "read_trace",
    "write_trace",
]

FORMAT = "chatd-trace"
VERSION = 1
KINDS = ("connect", "disconnect", "send", "delivered", "read", "typing", "history")
_FIELDS: dict[str, tuple[str, ...]] = {
    "connect": (),
    "disconnect": (),
    "send": ("to", "size"),
    "delivered": ("with",),
    "read": ("with",),
    "typing": ("to", "on"),
    "history": ("with",),
}


class TraceError(ValueError):
    """A trace file that does not follow the format (says which line)."""


@dataclass(frozen=True, slots=True)
class TraceEvent:
    t: float
    user: str
    kind: str
    peer: str | None = None
    """`to` of send/typing, `with` of marks/history."""
    size: int = 0
    """`size` of send, `on` of typing (0/1), `limit` of history."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": round(self.t, 6), "u": self.user, "e": self.kind}
        k = self.kind
        if k == "send":
            out["to"] = self.peer
            out["size"] = self.size
        elif k in ("delivered", "read"):
            out["with"] = self.peer
        elif k == "typing":
            out["to"] = self.peer
            out["on"] = bool(self.size)
        elif k == "history":
            out["with"] = self.peer
            if self.size:
                out["limit"] = self.size
        return out


@dataclass(slots=True)
class Trace:
    events: list[TraceEvent]
    users: list[str] = field(default_factory=list)
    duration: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.users:
            seen: dict[str, None] = {}
            for ev in self.events:
                seen.setdefault(ev.user, None)
                if ev.peer is not None:
                    seen.setdefault(ev.peer, None)
            self.users = list(seen)
        if not self.duration and self.events:
            self.duration = self.events[-1].t

    def header(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "users": self.users,
            "duration": self.duration,
            "meta": self.meta,
        }

    def count(self, kind: str) -> int:
        return sum(1 for e in self.events if e.kind == kind)


def _open(path: Path, mode: str) -> IO[str]:
    if path.suffix == ".gz":
        return cast(IO[str], gzip.open(path, mode + "t", encoding="utf-8"))
    return open(path, mode, encoding="utf-8")


def write_trace(trace: Trace, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with _open(p, "w") as f:
        f.write(json.dumps(trace.header(), separators=(",", ":")) + "\n")
        for ev in trace.events:
            f.write(json.dumps(ev.to_json(), separators=(",", ":")) + "\n")


def _parse_event(obj: Any, lineno: int) -> TraceEvent:
    if not isinstance(obj, dict):
        raise TraceError(f"line {lineno}: an event must be a JSON object")
    try:
        t = float(obj["t"])
        user = obj["u"]
        kind = obj["e"]
    except (KeyError, TypeError, ValueError):
        raise TraceError(f"line {lineno}: an event needs 't', 'u' and 'e'") from None
    if kind not in _FIELDS:
        raise TraceError(f"line {lineno}: unknown event kind {kind!r}")
    if not isinstance(user, str) or not user:
        raise TraceError(f"line {lineno}: 'u' must be a user id")
    for name in _FIELDS[kind]:
        if name not in obj:
            raise TraceError(f"line {lineno}: {kind} needs {name!r}")
    if t < 0:
        raise TraceError(f"line {lineno}: negative time")
    if kind == "send":
        size = int(obj["size"])
        if size < 0:
            raise TraceError(f"line {lineno}: negative size")
        return TraceEvent(t, user, kind, str(obj["to"]), size)
    if kind == "typing":
        return TraceEvent(t, user, kind, str(obj["to"]), 1 if obj["on"] else 0)
    if kind in ("delivered", "read"):
        return TraceEvent(t, user, kind, str(obj["with"]))
    if kind == "history":
        return TraceEvent(t, user, kind, str(obj["with"]), int(obj.get("limit") or 0))
    return TraceEvent(t, user, kind)


def iter_lines(lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"line {n}: not JSON ({exc.msg})") from None


def read_trace(path: str | Path) -> Trace:
    """Parse a trace; events are (stably) sorted by time."""
    p = Path(path)
    header: dict[str, Any] = {}
    events: list[TraceEvent] = []
    with _open(p, "r") as f:
        for n, obj in iter_lines(f):
            if n == 1 and isinstance(obj, dict) and obj.get("format") == FORMAT:
                if obj.get("version") != VERSION:
                    raise TraceError(f"unsupported trace version {obj.get('version')!r}")
                header = obj
                continue
            events.append(_parse_event(obj, n))
    events.sort(key=lambda e: e.t)
    users = [str(u) for u in header.get("users", [])]
    known = set(users)
    for ev in events:
        for u in (ev.user, ev.peer):
            if u is not None and u not in known:
                known.add(u)
                users.append(u)
    return Trace(
        events,
        users,
        float(header.get("duration") or (events[-1].t if events else 0.0)),
        dict(header.get("meta") or {}),
    )
