"""`record --from-db URL`: turn a chatd database's real traffic into a trace.

Reads the `messages` table (who -> whom, body size, time) and the users' own
marks from `events` (kind delivered/read where `by_user` is the stream's user),
hashes user ids (sha256 with a salt), drops bodies, and makes times relative to
the first message (plus a 1 s connect phase in which every user connects).
Replay it time-compressed with `replay --speed 10`.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.ext.asyncio import create_async_engine

from storage.schema import convs, events, messages
from storage.urls import normalize_url

from .trace import Trace, TraceEvent, write_trace

__all__ = ["hash_user", "record", "record_trace"]

CONNECT_PHASE = 1.0


def hash_user(user: str, salt: str = "") -> str:
    return "h" + hashlib.sha256((salt + "\0" + user).encode()).hexdigest()[:15]


async def _rows(url: str, since_ms: int, until_ms: int) -> tuple[list[Any], list[Any]]:
    engine = create_async_engine(normalize_url(url))
    try:
        async with engine.connect() as conn:
            q = select(
                messages.c.sender,
                messages.c.recipient,
                messages.c.ts,
                func.length(messages.c.body).label("size"),
            ).order_by(messages.c.ts, messages.c.mid)
            if since_ms:
                q = q.where(messages.c.ts >= since_ms)
            if until_ms:
                q = q.where(messages.c.ts < until_ms)
            msgs = list((await conn.execute(q)).all())
            m = (
                select(events.c.user_id, events.c.kind, events.c.ts, convs.c.user_a, convs.c.user_b)
                .select_from(events.join(convs, events.c.conv == convs.c.conv))
                .where(
                    and_(
                        events.c.kind.in_(("delivered", "read")),
                        events.c.by_user == events.c.user_id,
                    )
                )
                .order_by(events.c.ts)
            )
            if since_ms:
                m = m.where(events.c.ts >= since_ms)
            if until_ms:
                m = m.where(events.c.ts < until_ms)
            marks = list((await conn.execute(m)).all())
    finally:
        await engine.dispose()
    return msgs, marks


def record_trace(url: str, *, salt: str = "", since_ms: int = 0, until_ms: int = 0) -> Trace:
    msgs, marks = asyncio.run(_rows(url, since_ms, until_ms))
    if not msgs:
        return Trace([], [], 0.0, {"recorded_from": url.split("://", 1)[0]})
    t0 = min(r.ts for r in msgs)
    users: dict[str, str] = {}

    def h(u: str) -> str:
        if u not in users:
            users[u] = hash_user(u, salt)
        return users[u]

    evs: list[TraceEvent] = []
    for r in msgs:
        t = CONNECT_PHASE + (r.ts - t0) / 1000.0
        evs.append(TraceEvent(t, h(r.sender), "send", h(r.recipient), int(r.size or 0)))
    for r in marks:
        if r.ts < t0:
            continue
        peer = r.user_b if r.user_id == r.user_a else r.user_a
        evs.append(TraceEvent(CONNECT_PHASE + (r.ts - t0) / 1000.0, h(r.user_id), r.kind, h(peer)))
    names = list(users.values())
    n = len(names)
    evs += [
        TraceEvent(CONNECT_PHASE * i / max(n, 1) * 0.9, u, "connect") for i, u in enumerate(names)
    ]
    evs.sort(key=lambda e: e.t)
    meta = {"recorded_from": url.split("://", 1)[0], "messages": len(msgs), "hashed": True}
    return Trace(evs, names, evs[-1].t if evs else 0.0, meta)


def record(url: str, out: str | Path, **kw: Any) -> int:
    trace = record_trace(url, **kw)
    write_trace(trace, out)
    return len(trace.events)
