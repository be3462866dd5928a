"""The PostgreSQL group commit: one batch in two round trips on a plain asyncpg connection.

    SELECT chatd_batch_read2(...)    steps 1-4 (storage/plan.py) on the server: every
                                     row the plan needs (a statement of its own: its
                                     locks end with it); rows it misses (new people, new
                                     conversations) are created by chatd_create_rows in a
                                     transaction of its own, and it is asked again
    (step 5 in Python: `storage.plan.BatchPlan`, the same code as on SQLite)
    SELECT chatd_batch_write_checked(...)
                                     step 6 on the server, from parallel arrays, in a
                                     statement of its own: it locks the rows, checks that
                                     they are as the plan saw them, writes, commits

If another commit moved one of those rows in between (another node's, or this node's
other writer's, for the same people), the check raises 40001 and the batch is done
again the locked way, which cannot fail so:

    BEGIN; chatd_batch_read2 (its locks held); plan; chatd_batch_write; COMMIT

Locks were held across three round trips and a busy event loop for every batch; two
nodes that write for the same people then queued on each other (migration 0004 says
more). Now they are held for one statement, except after a conflict. While many checked
writes conflict (busy people: most batches share some), batches go the locked way at
once, with a checked one now and then to see when that ends (`Way`).

The functions are created by migrations 0002 and 0004 (which says why rows are
created apart). `PrefetchIO` is the `BatchIO`
the plan runs on: it answers steps 1-4 from the read function's answer and
records step 6 for the write function, so the plan stays synchronous and backend
free. SQLAlchemy is not on this path: its per-statement cost was most of the
writer's CPU (its reads still use SQLAlchemy, `storage.reads`).

Each writer connection reconnects on its next batch after it broke (an outage, a
restart, a terminated backend); the failed batch is answered StorageUnavailable
by `storage.writer`. With `statement_cache_size=0` in the URL (PgBouncer in
transaction pooling mode, which before 1.21 cannot carry named prepared
statements from one transaction to the next) each statement is prepared unnamed
in its own transaction.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from storage.base import conv_id
from storage.batch_io import Row
from storage.ops import MarkOp, Op, SendOp
from storage.plan import apply_batch

__all__ = ["PgBatchWriter", "PrefetchIO", "Way"]

_CONNECT_TIMEOUT_S = 10.0
_COMMAND_TIMEOUT_S = 30.0
"""A batch whose statements take longer (a hung connection) fails and reconnects."""

_READ_SQL = "SELECT chatd_batch_read2($1, $2, $3, $4, $5, $6)"
_CREATE_SQL = "SELECT chatd_create_rows($1, $2, $3, $4)"
_WRITE_SQL = "SELECT chatd_batch_write(" + ", ".join(f"${i}" for i in range(1, 35)) + ")"
_CHECKED_SQL = "SELECT chatd_batch_write_checked(" + ", ".join(f"${i}" for i in range(1, 39)) + ")"

_MESSAGE_COLS = (
    "mid",
    "conv",
    "seq",
    "sender",
    "recipient",
    "cmid",
    "ts",
    "type",
    "body",
    "is_text",
    "sender_cur",
    "recipient_cur",
)
_EVENT_COLS = ("user_id", "cur", "kind", "conv", "mid", "upto", "by_user", "ts")
_MEMBER_COLS = ("user_id", "conv", "peer", "delivered", "read", "last_recv_seq", "unread")


class PrefetchIO:
    """A `storage.batch_io.BatchIO` over the answer of `chatd_batch_read2` (steps 1-4 done
    on the server: every row exists and is locked) that records step 6's rows."""

    def __init__(self, answer: Mapping[str, Any]) -> None:
        self._users = {u: {"user_id": u, "last_cur": c} for u, c in answer["users"] or ()}
        self._convs = {
            c: {"conv": c, "last_seq": s, "last_ts": t, "last_mid": m}
            for c, s, t, m in answer["convs"] or ()
        }
        self._members = {
            (r[0], r[1]): dict(zip(_MEMBER_COLS, r, strict=True)) for r in answer["members"] or ()
        }
        self._stored: dict[tuple[str, str], dict[str, Any]] = {}
        for m in answer["stored"] or ():
            m["body"] = base64.b64decode(m["body"])
            self._stored[(m["sender"], m["cmid"])] = m
        self._mids: list[int] = answer["mids"] or []
        self.messages: list[Row] = []
        self.events: list[Row] = []
        self.user_curs: list[Row] = []
        self.convs: list[Row] = []
        self.members: list[Row] = []
        self.recount: list[Row] = []

    def pairs(
        self,
        table: str,
        key: tuple[str, str],
        cols: Sequence[str],
        pairs: Sequence[tuple[str, str]],
    ) -> list[Row]:
        rows = self._members if table == "members" else self._stored
        return [rows[p] for p in pairs if p in rows]

    def lock_users(self, ids: Sequence[str]) -> list[Row]:
        return [self._users[u] for u in ids if u in self._users]

    def lock_convs(self, keys: Sequence[str]) -> list[Row]:
        return [self._convs[c] for c in keys if c in self._convs]

    def insert_missing(self, table: str, key: Sequence[str], rows: Sequence[Row]) -> None:
        # Every row the plan asks for exists (`_read`); a miss is a bug in one of them.
        raise RuntimeError(f"chatd_batch_read2 did not find the {table} rows the plan needs")

    def insert_messages(self, rows: Sequence[Row]) -> list[int]:
        if len(rows) > len(self._mids):
            raise RuntimeError("chatd_batch_read2 allotted too few message ids")
        mids = self._mids[: len(rows)]
        self.messages.extend({**r, "mid": mid} for r, mid in zip(rows, mids, strict=True))
        return mids

    def insert_events(self, rows: Sequence[Row]) -> None:
        self.events.extend(rows)

    def update_user_curs(self, rows: Sequence[Row]) -> None:
        self.user_curs.extend(rows)

    def update_convs(self, rows: Sequence[Row]) -> None:
        self.convs.extend(rows)

    def update_members(self, rows: Sequence[Row]) -> None:
        self.members.extend(rows)

    def recount_unread(self, rows: Sequence[Row]) -> None:
        self.recount.extend(rows)

    def seen(self) -> list[list[Any]]:
        """The 4 arrays that `chatd_batch_write_checked` checks: the users and convs
        rows read, with the `last_cur` and `last_seq` the plan saw."""
        users, convs = self._users.values(), self._convs.values()
        return [
            [r["user_id"] for r in users],
            [r["last_cur"] for r in users],
            [r["conv"] for r in convs],
            [r["last_seq"] for r in convs],
        ]

    def write_args(self) -> list[list[Any]]:
        """The 34 arrays of `chatd_batch_write`, column by column."""
        out = _columns(self.messages, _MESSAGE_COLS) + _columns(self.events, _EVENT_COLS)
        out += _columns(self.user_curs, ("b_user", "b_cur"))
        out += _columns(self.convs, ("b_conv", "b_seq", "b_ts", "b_mid"))
        out += _columns(
            self.members, ("b_user", "b_conv", "b_delivered", "b_read", "b_recv", "b_unread")
        )
        return out + _columns(self.recount, ("b_user", "b_conv"))


def _columns(rows: Sequence[Row], cols: Sequence[str]) -> list[list[Any]]:
    return [[r[c] for r in rows] for c in cols]


def read_args(batch: Sequence[Op]) -> list[list[str]]:
    """The 6 arrays of `chatd_batch_read2`: the sends (sender, recipient, cmid, conv) in
    queue order, and the marks (user, conv)."""
    sends = [op for op in batch if isinstance(op, SendOp)]
    marks = [op for op in batch if isinstance(op, MarkOp)]
    return [
        [s.sender for s in sends],
        [s.recipient for s in sends],
        [s.cmid for s in sends],
        [conv_id(s.sender, s.recipient) for s in sends],
        [m.user for m in marks],
        [m.conv for m in marks],
    ]


class Way:
    """Which way the next batch goes: checked (two statements, no lock held between
    them) while few checked writes conflict, else locked (its rows held from the read
    to the COMMIT, four round trips, but never planned twice), with a checked one every
    `probe` batches to see whether conflicts have become rare again.

    Measured (loadtest/README.md, seventh sitting): with batches that share people
    (200 busy users) 60 % of checked writes conflicted, and the locked way had a lower
    p99 (150-176 against 218-256 ms) and CPU; with batches that rarely share people the
    checked way saves two round trips and holds no lock across them."""

    __slots__ = ("_since", "probe", "rate", "threshold")

    def __init__(self, threshold: float = 0.25, probe: int = 20) -> None:
        self.threshold, self.probe = threshold, probe
        self.rate = 0.0
        """Conflicts among recent checked writes (moving average, weight 0.1)."""
        self._since = 0

    def checked(self) -> bool:
        if self.rate < self.threshold:
            return True
        self._since += 1
        if self._since >= self.probe:
            self._since = 0
            return True
        return False

    def tried(self, conflict: bool) -> None:
        self.rate = 0.9 * self.rate + (0.1 if conflict else 0.0)


class _RowsMissing(Exception):
    def __init__(self, answer: Mapping[str, Any]) -> None:
        super().__init__("rows missing")
        self.answer = answer


async def _read(conn: asyncpg.Connection, batch: Sequence[Op]) -> Mapping[str, Any]:
    """`chatd_batch_read2`'s answer for `batch`. Rows it misses (new people, new
    conversations) are created first by `chatd_create_rows`, in a transaction of its
    own (inside one, `_RowsMissing` says so: the caller rolls back and creates them)."""
    args = read_args(batch)
    for _ in range(3):
        answer: Mapping[str, Any] = json.loads(await conn.fetchval(_READ_SQL, *args))
        if not answer.get("missing"):
            return answer
        if conn.is_in_transaction():
            raise _RowsMissing(answer)
        await _create(conn, answer)
    raise RuntimeError("chatd_batch_read2 kept finding rows missing")


async def _create(conn: asyncpg.Connection, missing: Mapping[str, Any]) -> None:
    """Insert the rows `chatd_batch_read2` found missing (each `ON CONFLICT DO NOTHING`)."""
    cols = [missing.get(k) or [] for k in ("users", "convs", "a", "b")]
    await conn.execute(_CREATE_SQL, *cols)


class PgBatchWriter:
    """The writer's connections to PostgreSQL and the commit of one batch on one of them.

    `dsn`: an asyncpg DSN. `statement_cache_size`: asyncpg's (0 behind PgBouncer's
    transaction pooling). Each batch takes an idle connection (or opens one): as many
    connections as batches commit at once (`storage.writer`'s `concurrency`)."""

    def __init__(self, dsn: str, *, statement_cache_size: int = 100) -> None:
        self.dsn = dsn
        self.statement_cache_size = statement_cache_size
        self._idle: list[asyncpg.Connection] = []
        self.conflicts = 0
        """Batches whose checked write found a row moved, done again the locked way."""
        self.locked = 0
        """Batches done the locked way at once (`Way`: checked writes conflicted lately)."""
        self.way = Way()

    async def _connection(self) -> asyncpg.Connection:
        """An idle connection, or a new one. One that broke while idle fails its next
        batch (as a broken one in use does), which drops it: one outage, one failed
        batch per connection, whenever it is noticed."""
        if self._idle:
            return self._idle.pop()
        return await asyncpg.connect(
            self.dsn,
            timeout=_CONNECT_TIMEOUT_S,
            command_timeout=_COMMAND_TIMEOUT_S,
            statement_cache_size=self.statement_cache_size,
        )

    async def commit(self, batch: Sequence[Op]) -> list[object]:
        """One transaction for `batch`: a result per op (see `storage.writer.Commit`)."""
        conn = await self._connection()
        try:
            results = None
            if self.way.checked():
                results = await self._checked(conn, batch)
                self.way.tried(conflict=results is None)
                self.conflicts += results is None
            else:
                self.locked += 1
            if results is None:
                results = await self._locked(conn, batch)
        except BaseException as exc:
            if (
                isinstance(exc, asyncpg.PostgresError)
                and not conn.is_closed()
                and not conn.is_in_transaction()
            ):
                self._idle.append(conn)  # the database refused: the connection is fine
            else:  # a timeout, a cancel, a broken socket: the connection's state is unknown
                conn.terminate()
            raise
        self._idle.append(conn)
        return results

    @staticmethod
    async def _checked(conn: asyncpg.Connection, batch: Sequence[Op]) -> list[object] | None:
        """The batch in two statements, each its own transaction; None if the write
        found a row moved since the read (nothing of the batch is stored then)."""
        answer = await _read(conn, batch)
        io = PrefetchIO(answer)
        seen = io.seen()  # before the plan, which may change its rows
        results = apply_batch(io, batch)
        try:
            await conn.execute(_CHECKED_SQL, *seen, *io.write_args())
        except (asyncpg.SerializationError, asyncpg.UniqueViolationError):
            return None  # (a unique violation: the same (sender, cmid) came in between)
        return results

    @staticmethod
    async def _locked(conn: asyncpg.Connection, batch: Sequence[Op]) -> list[object]:
        """The batch in one transaction, its rows locked from the read to the COMMIT."""
        for _ in range(3):
            try:
                async with conn.transaction():
                    io = PrefetchIO(await _read(conn, batch))
                    results = apply_batch(io, batch)
                    await conn.execute(_WRITE_SQL, *io.write_args())
                return results
            except _RowsMissing as missing:  # rolled back: create them, and again
                await _create(conn, missing.answer)
        raise RuntimeError("chatd_batch_read2 kept finding rows missing")

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            try:
                async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                    await conn.close()
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                conn.terminate()
