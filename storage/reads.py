"""`SqlReads`: the read queries of `SqlStore`, on the reader engine's pool.

Reads never go through the group-commit writer: each opens a connection of the
reader pool. A driver error is StorageUnavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal, cast

from sqlalchemy import ColumnElement, Select, and_, literal_column, select
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from storage.base import (
    ConvSummary,
    Event,
    HistoryPage,
    ReceiptRecord,
    SendOutcome,
    StorageError,
    StorageUnavailable,
    conv_id,
)
from storage.errors import is_driver_error
from storage.records import MSG_COLS, dup_from, message_from
from storage.schema import convs, events, members, messages, users

__all__ = ["SqlReads"]

_PING_TIMEOUT_S = 5.0
_MSG_COL_NAMES = frozenset(c.name for c in MSG_COLS)


def _message_cols_of(m: Any) -> list[Any]:
    """The `MSG_COLS` of the messages alias `m`, labelled `m_<name>` (see `message_from`)."""
    return [c.label("m_" + c.name) for c in m.c if c.name in _MSG_COL_NAMES]


class SqlReads:
    """The Store's reads (see `storage.base.Store` for each), on `engine` (None: closed).

    The store sets `engine` when it opens and clears it when it closes; `ping_engine`
    likewise: health checks have a connection of their own, so that they never wait
    behind users' reads (a node stays ready while its read pool is busy)."""

    def __init__(self) -> None:
        self.engine: AsyncEngine | None = None
        self.ping_engine: AsyncEngine | None = None

    @contextlib.asynccontextmanager
    async def _connect(self, engine: AsyncEngine | None = None) -> AsyncIterator[AsyncConnection]:
        engine = engine or self.engine
        if engine is None:
            raise StorageUnavailable("store is not open")
        try:
            async with engine.connect() as conn:
                yield conn
        except StorageError:
            raise
        except Exception as exc:
            if is_driver_error(exc):
                raise StorageUnavailable(f"database unavailable: {type(exc).__name__}") from exc
            raise

    async def find_sent(self, sender: str, cmid: str) -> SendOutcome | None:
        async with self._connect() as conn:
            row = (
                await conn.execute(
                    select(*MSG_COLS, messages.c.sender_cur, messages.c.recipient_cur).where(
                        messages.c.sender == sender, messages.c.cmid == cmid
                    )
                )
            ).first()
        return None if row is None else dup_from(row._mapping)

    async def last_cur(self, user: str) -> int:
        async with self._connect() as conn:
            value = await conn.scalar(select(users.c.last_cur).where(users.c.user_id == user))
        return 0 if value is None else int(value)

    async def last_curs(self, users_: Sequence[str]) -> dict[str, int]:
        if not users_:
            return {}
        q = select(users.c.user_id, users.c.last_cur).where(users.c.user_id.in_(users_))
        async with self._connect() as conn:
            return {r.user_id: int(r.last_cur) for r in await conn.execute(q)}

    async def events(self, user: str, after: int, upto: int, limit: int) -> list[Event]:
        if limit <= 0 or upto <= after:
            return []
        m = messages.alias("m")
        q = (
            select(
                events.c.cur,
                events.c.kind,
                events.c.conv,
                events.c.upto,
                events.c.by_user,
                events.c.ts,
                *_message_cols_of(m),
            )
            .select_from(events.outerjoin(m, m.c.mid == events.c.mid))
            .where(events.c.user_id == user, events.c.cur > after, events.c.cur <= upto)
            .order_by(events.c.cur)
            .limit(limit)
        )
        async with self._connect() as conn:
            rows = await conn.execute(q)
            return [_event_from(user, mp) for mp in rows.mappings()]

    async def undelivered(self, user: str, after: int, upto: int, limit: int) -> list[Event]:
        if limit <= 0 or upto <= after:
            return []
        m = messages.alias("m")
        mb = members.alias("mb")
        q = (
            select(events.c.cur, *_message_cols_of(m))
            .select_from(
                events.join(m, m.c.mid == events.c.mid).join(
                    mb, and_(mb.c.user_id == events.c.user_id, mb.c.conv == m.c.conv)
                )
            )
            .where(
                events.c.user_id == user,
                events.c.cur > after,
                events.c.cur <= upto,
                events.c.kind == "msg",
                m.c.recipient == user,
                m.c.seq > mb.c.delivered,
            )
            .order_by(events.c.cur)
            .limit(limit)
        )
        async with self._connect() as conn:
            rows = await conn.execute(q)
            return [
                Event(user=user, cur=int(mp["cur"]), message=message_from(mp, "m_"))
                for mp in rows.mappings()
            ]

    async def history(self, user: str, peer: str, before: int | None, limit: int) -> HistoryPage:
        c = conv_id(user, peer)
        conds: list[ColumnElement[bool]] = [messages.c.conv == c]
        if before is not None:
            conds.append(messages.c.seq < before)
        q = select(*MSG_COLS).where(*conds).order_by(messages.c.seq.desc())
        q = q.limit(max(0, limit) + 1)
        async with self._connect() as conn:
            rows = list(await conn.execute(q))
            wm = (
                await conn.execute(
                    select(members.c.delivered, members.c.read).where(
                        members.c.user_id == peer, members.c.conv == c
                    )
                )
            ).first()
        more = len(rows) > max(0, limit)
        msgs = [message_from(r._mapping) for r in rows[: max(0, limit)]]
        return HistoryPage(
            conv=c,
            messages=msgs,
            more=more,
            delivered=0 if wm is None else int(wm.delivered),
            read=0 if wm is None else int(wm.read),
        )

    async def convs(self, user: str, limit: int) -> list[ConvSummary]:
        if limit <= 0:
            return []
        async with self._connect() as conn:
            rows = await conn.execute(_convs_query(user, limit))
            return [
                ConvSummary(
                    conv=r.conv,
                    peer=r.peer,
                    seq=int(r.last_seq),
                    ts=int(r.last_ts),
                    unread=int(r.unread),
                    delivered=int(r.delivered),
                    read=int(r.read),
                )
                for r in rows
            ]

    async def ping(self) -> None:
        try:
            engine = self.ping_engine
            async with asyncio.timeout(_PING_TIMEOUT_S), self._connect(engine) as conn:
                await conn.execute(select(literal_column("1")))
        except TimeoutError as exc:
            raise StorageUnavailable("database ping timed out") from exc


def _event_from(user: str, mp: RowMapping) -> Event:
    if mp["kind"] == "msg":
        return Event(user=user, cur=int(mp["cur"]), message=message_from(mp, "m_"))
    kind = cast(Literal["delivered", "read"], mp["kind"])
    return Event(
        user=user,
        cur=int(mp["cur"]),
        receipt=ReceiptRecord(
            conv=mp["conv"],
            kind=kind,
            upto=int(mp["upto"]),
            by=mp["by_user"],
            ts=int(mp["ts"]),
        ),
    )


def _convs_query(user: str, limit: int) -> Select[Any]:
    """The user's conversations with the peer's marks, newest last message first: a
    range of the (user_id, last_ts, last_mid) index, `limit` rows long."""
    me = members.alias("me")
    other = members.alias("other")
    return (
        select(
            me.c.conv,
            me.c.peer,
            me.c.unread,
            convs.c.last_seq,
            convs.c.last_ts,
            other.c.delivered,
            other.c.read,
        )
        .select_from(
            me.join(convs, convs.c.conv == me.c.conv).join(
                other, and_(other.c.conv == me.c.conv, other.c.user_id == me.c.peer)
            )
        )
        .where(me.c.user_id == user, convs.c.last_seq > 0)
        .order_by(me.c.last_ts.desc(), me.c.last_mid.desc())  # the member activity index
        .limit(limit)
    )
