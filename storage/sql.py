"""`SqlStore`: the Store on SQLAlchemy 2 asyncio Core, SQLite (aiosqlite) or PostgreSQL (asyncpg).

Group commit
------------
One writer task owns every write. `send()` / `mark()` queue an op with a
future and await it. The writer takes the first op, drains the ops already
queued (up to `max_batch`), runs them all in ONE transaction, commits, then
resolves the futures in queue order. The number of statements per batch does
not grow with its size (executemany for the rows):

1. (marks only) read the marking users' member rows, to learn the peers;
2. lock the `users` rows of everyone involved, sorted by id (PostgreSQL:
   SELECT ... FOR UPDATE; SQLite: the writer's BEGIN IMMEDIATE), insert the
   missing ones (ON CONFLICT DO NOTHING) and lock those. This row lock is what
   makes `cur` gap-free and in commit order per user, and `seq` unique per
   conversation, when several nodes share one PostgreSQL: every transaction
   touching a conversation holds the locks of both its people;
3. one SELECT for the (sender, cmid) already stored;
4. lock the `convs` rows (sorted), insert the missing convs / members rows,
   read the members rows;
5. compute seq / cur / watermarks in Python, in queue order;
6. executemany inserts of messages (RETURNING mid) and events, executemany
   updates of the counters, watermarks and unread counts (an unread count is
   recounted with one correlated COUNT per member whose read mark moved).

A validation failure of one op (NotAMember, UptoTooHigh) is decided in step 5
and fails only that op. A failed transaction fails every op of the batch with
StorageUnavailable (nothing was stored) and the writer goes on with the next
batch. A PostgreSQL deadlock / serialization failure / lost unique race is
retried a few times first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from sqlalchemy import (
    ColumnElement,
    Select,
    Table,
    TextClause,
    and_,
    bindparam,
    event,
    func,
    literal_column,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from storage.base import (
    ConvSummary,
    Event,
    HistoryPage,
    MarkKind,
    MarkOutcome,
    NotAMember,
    ReceiptRecord,
    SendOutcome,
    StorageError,
    StorageUnavailable,
    StoredMessage,
    UptoTooHigh,
    conv_id,
)
from storage.errors import RETRYABLE_SQLSTATES, is_driver_error, sqlstate
from storage.schema import convs, events, members, messages, users
from storage.urls import normalize_url

__all__ = ["SqlStore"]

log = logging.getLogger("chatd.storage")

_RETRIES = 5
_SQLITE_BUSY_TIMEOUT_MS = 10_000
_PING_TIMEOUT_S = 5.0
_PG_CONNECT_TIMEOUT_S = 10.0


# --------------------------------------------------------------------------- ops


@dataclass(slots=True)
class _SendOp:
    sender: str
    recipient: str
    cmid: str
    body: str | bytes
    type: str
    ts: int
    future: asyncio.Future[SendOutcome]


@dataclass(slots=True)
class _MarkOp:
    user: str
    conv: str
    kind: MarkKind
    upto: int
    ts: int
    future: asyncio.Future[MarkOutcome]


_Op = _SendOp | _MarkOp


@dataclass(slots=True)
class _Conv:
    last_seq: int
    last_ts: int
    last_mid: int
    dirty: bool = False


@dataclass(slots=True)
class _Member:
    peer: str
    delivered: int
    read: int
    last_recv_seq: int
    unread: int
    dirty: bool = False
    recount: bool = False


@dataclass(slots=True)
class _PendingMsg:
    """A message to insert; its mid is known after the INSERT."""

    op_index: int
    row: dict[str, Any]
    event_rows: list[dict[str, Any]] = field(default_factory=list)


def _encode_body(body: str | bytes) -> tuple[bytes, bool]:
    if isinstance(body, str):
        return body.encode("utf-8"), True
    return bytes(body), False


def _decode_body(body: bytes, is_text: bool) -> str | bytes:
    return bytes(body).decode("utf-8") if is_text else bytes(body)


def _message_from(m: RowMapping, prefix: str = "") -> StoredMessage:
    return StoredMessage(
        mid=int(m[prefix + "mid"]),
        conv=m[prefix + "conv"],
        seq=int(m[prefix + "seq"]),
        sender=m[prefix + "sender"],
        recipient=m[prefix + "recipient"],
        cmid=m[prefix + "cmid"],
        ts=int(m[prefix + "ts"]),
        type=m[prefix + "type"],
        body=_decode_body(m[prefix + "body"], bool(m[prefix + "is_text"])),
    )


def _dup_from(m: RowMapping) -> SendOutcome:
    return SendOutcome(
        message=_message_from(m),
        sender_cur=int(m["sender_cur"]),
        recipient_cur=int(m["recipient_cur"]),
        dup=True,
    )


_MSG_COLS = (
    messages.c.mid,
    messages.c.conv,
    messages.c.seq,
    messages.c.sender,
    messages.c.recipient,
    messages.c.cmid,
    messages.c.ts,
    messages.c.type,
    messages.c.body,
    messages.c.is_text,
)


_DUP_COL_NAMES = (*(c.name for c in _MSG_COLS), "sender_cur", "recipient_cur")
_MEMBER_COL_NAMES = tuple(c.name for c in members.c)


class _Unavailable(Exception):
    """Internal: a batch failed for a reason that is not a driver error."""


# ------------------------------------------------------------------------- store


class SqlStore:
    """The Store on SQLite or PostgreSQL. See the module docstring for group commit.

    `url`: anything `storage.urls.normalize_url` accepts. `group_commit=False`
    runs one op per transaction (for benchmarks). `max_batch`: ops per
    transaction at most. `pool_size`: connections for reads (the writer has
    its own single connection).
    """

    def __init__(
        self,
        url: str,
        *,
        group_commit: bool = True,
        max_batch: int = 256,
        pool_size: int = 10,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.url = normalize_url(url)
        self.group_commit = group_commit
        self.max_batch = max_batch if group_commit else 1
        self.pool_size = pool_size
        self._sqlite = self.url.startswith("sqlite")
        self._reader: AsyncEngine | None = None
        self._writer_engine: AsyncEngine | None = None
        self._queue: asyncio.Queue[_Op | None] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None
        self._pair_sql: dict[tuple[object, ...], TextClause] = {}
        self._closing = False
        #: Counters for metrics / tests: batches committed, ops in them.
        self.batches = 0
        self.batched_ops = 0

    # ---------------------------------------------------------------- lifecycle

    def _make_engine(self, *, writer: bool) -> AsyncEngine:
        size = 1 if writer else max(1, self.pool_size)
        if self._sqlite:
            engine = create_async_engine(self.url, pool_size=size, max_overflow=0)
            begin_sql = "BEGIN IMMEDIATE" if writer else "BEGIN"

            @event.listens_for(engine.sync_engine, "connect")
            def _on_connect(dbapi_conn: Any, _record: ConnectionPoolEntry) -> None:
                dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
                cursor = dbapi_conn.cursor()
                try:
                    cursor.execute("PRAGMA journal_mode=WAL")
                    cursor.execute("PRAGMA synchronous=FULL")
                    cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
                    cursor.execute("PRAGMA foreign_keys=ON")
                finally:
                    cursor.close()

            @event.listens_for(engine.sync_engine, "begin")
            def _on_begin(conn: Any) -> None:
                conn.exec_driver_sql(begin_sql)

            return engine
        return create_async_engine(
            self.url,
            pool_size=size,
            max_overflow=0 if writer else size,
            pool_pre_ping=not writer,
            connect_args={"timeout": _PG_CONNECT_TIMEOUT_S},
        )

    async def open(self) -> None:
        """Connect and start the group-commit writer. Migrations are separate.

        Raises StorageUnavailable when the database does not answer.
        """
        if self._writer_task is not None:
            return
        self._reader = self._make_engine(writer=False)
        self._writer_engine = self._make_engine(writer=True)
        self._closing = False
        try:
            await self.ping()
        except StorageUnavailable:
            await self._dispose()
            raise
        self._writer_task = asyncio.create_task(self._writer(), name="chatd-storage-writer")

    async def close(self) -> None:
        """Finish (or fail with StorageUnavailable) every queued write, then disconnect."""
        task = self._writer_task
        if task is not None and not self._closing:
            self._closing = True
            self._queue.put_nowait(None)
            try:
                await task
            finally:
                self._writer_task = None
        self._fail_queued()
        await self._dispose()

    async def _dispose(self) -> None:
        for engine in (self._reader, self._writer_engine):
            if engine is not None:
                with contextlib.suppress(Exception):
                    await engine.dispose()
        self._reader = None
        self._writer_engine = None

    def _fail_queued(self) -> None:
        while True:
            try:
                op = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if op is not None and not op.future.done():
                op.future.set_exception(StorageUnavailable("store closed"))

    # ------------------------------------------------------------------- writes

    def _submit(self, op: _Op) -> None:
        if self._writer_task is None or self._closing:
            raise StorageUnavailable("store is not open")
        self._queue.put_nowait(op)

    async def send(
        self, sender: str, recipient: str, cmid: str, body: str | bytes, type: str, ts: int
    ) -> SendOutcome:
        """Store a message durably (committed before it returns), once per (sender, cmid).

        Assigns `seq` in the conversation and one `cur` in each of the two
        streams. A repeated (sender, cmid) returns the original with dup=True,
        whatever its recipient and body (also when both are in one batch).
        Group commit: concurrent calls share one transaction.
        `sender != recipient` is the caller's job. If the caller is cancelled
        while waiting, the message may still be stored (a retry is a dup).
        """
        fut: asyncio.Future[SendOutcome] = asyncio.get_running_loop().create_future()
        self._submit(_SendOp(sender, recipient, cmid, body, type, ts, fut))
        return await fut

    async def mark(self, user: str, conv: str, kind: MarkKind, upto: int, ts: int) -> MarkOutcome:
        """Move `user`'s watermark of `kind` in `conv` forward, durably (see `Store.mark`).

        NotAMember also covers a conversation that does not exist (yet).
        """
        if kind not in ("delivered", "read"):
            raise ValueError(f"bad mark kind: {kind!r}")
        fut: asyncio.Future[MarkOutcome] = asyncio.get_running_loop().create_future()
        self._submit(_MarkOp(user, conv, kind, upto, ts, fut))
        return await fut

    async def _writer(self) -> None:
        queue = self._queue
        stop = False
        while not stop:
            first = await queue.get()
            if first is None:
                break
            batch: list[_Op] = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Op]) -> None:
        results: list[object] = []
        error: BaseException | None = None
        for attempt in range(_RETRIES):
            try:
                results = await self._commit_batch(batch)
                error = None
                break
            except asyncio.CancelledError:
                error = StorageUnavailable("store closed")
                break
            except Exception as exc:
                error = exc
                code = sqlstate(exc)
                if code in RETRYABLE_SQLSTATES and attempt + 1 < _RETRIES:
                    log.info("storage batch retry after %s (attempt %d)", code, attempt + 1)
                    continue
                break
        if error is not None:
            if is_driver_error(error) or isinstance(error, StorageUnavailable):
                log.warning("storage batch of %d failed: %s", len(batch), type(error).__name__)
            else:
                log.exception("storage batch of %d failed unexpectedly", len(batch), exc_info=error)
            for op in batch:
                if not op.future.done():
                    op.future.set_exception(
                        StorageUnavailable(f"transaction failed: {type(error).__name__}")
                    )
            return
        self.batches += 1
        self.batched_ops += len(batch)
        for op, res in zip(batch, results, strict=True):
            if op.future.done():
                continue
            if isinstance(res, BaseException):
                op.future.set_exception(res)
            else:
                op.future.set_result(res)  # type: ignore[arg-type]

    def _insert(self, table: Any) -> sqlite_dialect.Insert | pg_dialect.Insert:
        if self._sqlite:
            return sqlite_dialect.insert(table)
        return pg_dialect.insert(table)

    async def _select_pairs(
        self,
        conn: AsyncConnection,
        table: Table,
        key: tuple[str, str],
        cols: Sequence[str],
        pairs: Sequence[tuple[str, str]],
    ) -> list[RowMapping]:
        """The `cols` of the rows of `table` whose two-column `key` is one of `pairs`,
        through the index on `key`.

        PostgreSQL: a row-value IN with an expanding parameter. SQLite scans the
        whole table for a multi-row row-value IN, so there it is a join with a
        VALUES list, padded to a power of two (a handful of statement shapes).
        """
        ka, kb = key
        if not self._sqlite:
            q = select(*(table.c[n] for n in cols)).where(
                tuple_(table.c[ka], table.c[kb]).in_(list(pairs))
            )
            return list((await conn.execute(q)).mappings())
        size = 1
        while size < len(pairs):
            size *= 2
        padded = list(pairs) + [pairs[-1]] * (size - len(pairs))
        cache_key = (table.name, key, tuple(cols), size)
        stmt = self._pair_sql.get(cache_key)
        if stmt is None:
            rows = ", ".join(f"(:a{i}, :b{i})" for i in range(size))
            select_list = ", ".join(f't."{n}"' for n in cols)
            stmt = text(
                f"SELECT DISTINCT {select_list} FROM (VALUES {rows}) AS v "
                f'JOIN "{table.name}" AS t ON t."{ka}" = v.column1 AND t."{kb}" = v.column2'
            )
            self._pair_sql[cache_key] = stmt
        params: dict[str, str] = {}
        for i, (x, y) in enumerate(padded):
            params[f"a{i}"] = x
            params[f"b{i}"] = y
        return list((await conn.execute(stmt, params)).mappings())

    async def _lock_users(self, conn: AsyncConnection, ids: list[str]) -> dict[str, int]:
        """`last_cur` of the existing users among `ids` (sorted), locked on PostgreSQL."""
        q = (
            select(users.c.user_id, users.c.last_cur)
            .where(users.c.user_id.in_(ids))
            .order_by(users.c.user_id)
        )
        if not self._sqlite:
            q = q.with_for_update()
        return {r.user_id: int(r.last_cur) for r in await conn.execute(q)}

    async def _lock_convs(self, conn: AsyncConnection, keys: list[str]) -> dict[str, _Conv]:
        """The existing conversations among `keys` (sorted), locked on PostgreSQL."""
        q = (
            select(convs.c.conv, convs.c.last_seq, convs.c.last_ts, convs.c.last_mid)
            .where(convs.c.conv.in_(keys))
            .order_by(convs.c.conv)
        )
        if not self._sqlite:
            q = q.with_for_update()
        return {
            r.conv: _Conv(int(r.last_seq), int(r.last_ts), int(r.last_mid))
            for r in await conn.execute(q)
        }

    async def _commit_batch(self, batch: Sequence[_Op]) -> list[object]:
        engine = self._writer_engine
        if engine is None:
            raise StorageUnavailable("store is not open")
        async with engine.connect() as conn, conn.begin():
            results = await self._apply(conn, batch)
        return results

    async def _apply(self, conn: AsyncConnection, batch: Sequence[_Op]) -> list[object]:
        sends = [op for op in batch if isinstance(op, _SendOp)]
        marks = [op for op in batch if isinstance(op, _MarkOp)]

        # 1. the marking users' member rows: who is the peer (membership never changes).
        mark_peer: dict[tuple[str, str], str] = {}
        if marks:
            keys = sorted({(op.user, op.conv) for op in marks})
            peer_rows = await self._select_pairs(
                conn, members, ("user_id", "conv"), ("user_id", "conv", "peer"), keys
            )
            mark_peer = {(r["user_id"], r["conv"]): r["peer"] for r in peer_rows}
        # A mark in a conversation created by an earlier send of this batch.
        send_pairs = {conv_id(op.sender, op.recipient): (op.sender, op.recipient) for op in sends}
        for op in marks:
            if (op.user, op.conv) not in mark_peer and op.conv in send_pairs:
                a, b = send_pairs[op.conv]
                if op.user in (a, b):
                    mark_peer[(op.user, op.conv)] = b if op.user == a else a

        # 2. users: lock (sorted), create the missing ones, lock those.
        user_ids: set[str] = set()
        for s in sends:
            user_ids.add(s.sender)
            user_ids.add(s.recipient)
        for (u, _c), pu in mark_peer.items():
            user_ids.add(u)
            user_ids.add(pu)
        last_cur: dict[str, int] = {}
        if user_ids:
            last_cur = await self._lock_users(conn, sorted(user_ids))
            missing = sorted(user_ids - last_cur.keys())
            if missing:
                await conn.execute(
                    self._insert(users).on_conflict_do_nothing(index_elements=["user_id"]),
                    [{"user_id": u, "last_cur": 0} for u in missing],
                )
                last_cur.update(await self._lock_users(conn, missing))
        cur_dirty: set[str] = set()

        # 3. (sender, cmid) already stored.
        stored: dict[tuple[str, str], SendOutcome] = {}
        if sends:
            pairs = sorted({(s.sender, s.cmid) for s in sends})
            dup_rows = await self._select_pairs(
                conn, messages, ("sender", "cmid"), _DUP_COL_NAMES, pairs
            )
            for mp in dup_rows:
                stored[(mp["sender"], mp["cmid"])] = _dup_from(mp)

        # 4. convs and members: lock, create the missing ones, read.
        first_of: dict[tuple[str, str], int] = {}
        send_convs: dict[str, tuple[str, str]] = {}
        for i, s_op in enumerate(batch):
            if isinstance(s_op, _SendOp):
                key = (s_op.sender, s_op.cmid)
                if key in stored or key in first_of:
                    continue
                first_of[key] = i
                send_convs[conv_id(s_op.sender, s_op.recipient)] = (s_op.sender, s_op.recipient)
        conv_keys = sorted(set(send_convs) | {c for (_u, c) in mark_peer})
        conv_state: dict[str, _Conv] = {}
        member_state: dict[tuple[str, str], _Member] = {}
        if conv_keys:
            conv_state = await self._lock_convs(conn, conv_keys)
            new_convs = sorted(set(send_convs) - conv_state.keys())
            if new_convs:
                conv_rows = []
                member_rows = []
                for c in new_convs:
                    a, b = sorted(send_convs[c])
                    conv_rows.append({"conv": c, "user_a": a, "user_b": b})
                    member_rows.append({"user_id": a, "conv": c, "peer": b})
                    member_rows.append({"user_id": b, "conv": c, "peer": a})
                await conn.execute(
                    self._insert(convs).on_conflict_do_nothing(index_elements=["conv"]), conv_rows
                )
                await conn.execute(
                    self._insert(members).on_conflict_do_nothing(
                        index_elements=["user_id", "conv"]
                    ),
                    member_rows,
                )
                conv_state.update(await self._lock_convs(conn, new_convs))
            member_keys: set[tuple[str, str]] = set()
            for c, (a, b) in send_convs.items():
                member_keys.add((a, c))
                member_keys.add((b, c))
            member_keys.update(mark_peer)
            member_rows_now = await self._select_pairs(
                conn, members, ("user_id", "conv"), _MEMBER_COL_NAMES, sorted(member_keys)
            )
            for r in member_rows_now:
                member_state[(r["user_id"], r["conv"])] = _Member(
                    peer=r["peer"],
                    delivered=int(r["delivered"]),
                    read=int(r["read"]),
                    last_recv_seq=int(r["last_recv_seq"]),
                    unread=int(r["unread"]),
                )

        # 5. compute, in queue order.
        results: list[object] = [None] * len(batch)
        pending: list[_PendingMsg] = []
        receipt_rows: list[dict[str, Any]] = []
        dup_of: dict[int, int] = {}

        def next_cur(user: str) -> int:
            n = last_cur[user] + 1
            last_cur[user] = n
            cur_dirty.add(user)
            return n

        for i, b_op in enumerate(batch):
            if isinstance(b_op, _SendOp):
                sop = b_op
                key = (sop.sender, sop.cmid)
                if key in stored:
                    results[i] = stored[key]
                    continue
                if first_of[key] != i:
                    dup_of[i] = first_of[key]
                    continue
                c = conv_id(sop.sender, sop.recipient)
                cs = conv_state[c]
                cs.last_seq += 1
                cs.last_ts = sop.ts
                cs.dirty = True
                seq = cs.last_seq
                rm = member_state[(sop.recipient, c)]
                rm.last_recv_seq = seq
                rm.unread += 1
                rm.dirty = True
                s_cur = next_cur(sop.sender)
                r_cur = next_cur(sop.recipient)
                body, is_text = _encode_body(sop.body)
                row: dict[str, Any] = {
                    "conv": c,
                    "seq": seq,
                    "sender": sop.sender,
                    "recipient": sop.recipient,
                    "cmid": sop.cmid,
                    "ts": sop.ts,
                    "type": sop.type,
                    "body": body,
                    "is_text": is_text,
                    "sender_cur": s_cur,
                    "recipient_cur": r_cur,
                }
                evs = [
                    {"user_id": sop.sender, "cur": s_cur, "kind": "msg", "conv": c, "ts": sop.ts},
                    {
                        "user_id": sop.recipient,
                        "cur": r_cur,
                        "kind": "msg",
                        "conv": c,
                        "ts": sop.ts,
                    },
                ]
                pending.append(_PendingMsg(i, row, evs))
            else:
                mop = b_op
                mkey = (mop.user, mop.conv)
                peer = mark_peer.get(mkey)
                member = member_state.get(mkey)
                mcs = conv_state.get(mop.conv)
                # A conversation with no message yet (created later in this batch) does not exist.
                if peer is None or member is None or mcs is None or mcs.last_seq == 0:
                    results[i] = NotAMember(f"{mop.user} is not in conversation {mop.conv}")
                    continue
                if mop.upto > mcs.last_seq:
                    results[i] = UptoTooHigh(f"upto {mop.upto} > last seq {mcs.last_seq}")
                    continue
                capped = min(mop.upto, member.last_recv_seq)
                if mop.kind == "delivered":
                    if capped <= member.delivered:
                        results[i] = MarkOutcome(receipt=None, peer=peer)
                        continue
                    member.delivered = capped
                else:
                    if capped <= member.read:
                        results[i] = MarkOutcome(receipt=None, peer=peer)
                        continue
                    member.read = capped
                    member.delivered = max(member.delivered, capped)
                    member.recount = True
                member.dirty = True
                m_cur = next_cur(mop.user)
                p_cur = next_cur(peer)
                for u, cur in ((mop.user, m_cur), (peer, p_cur)):
                    receipt_rows.append(
                        {
                            "user_id": u,
                            "cur": cur,
                            "kind": mop.kind,
                            "conv": mop.conv,
                            "mid": None,
                            "upto": capped,
                            "by_user": mop.user,
                            "ts": mop.ts,
                        }
                    )
                results[i] = MarkOutcome(
                    receipt=ReceiptRecord(mop.conv, mop.kind, capped, mop.user, mop.ts),
                    marker_cur=m_cur,
                    peer=peer,
                    peer_cur=p_cur,
                )

        # 6. write.
        if pending:
            res = await conn.execute(
                messages.insert().returning(messages.c.mid, sort_by_parameter_order=True),
                [p.row for p in pending],
            )
            mids = [int(m) for m in res.scalars().all()]
            if len(mids) != len(pending):
                raise _Unavailable("insert returned a wrong number of mids")
            msg_events: list[dict[str, Any]] = []
            for pm, mid in zip(pending, mids, strict=True):
                prow = pm.row
                conv_state[prow["conv"]].last_mid = mid
                for ev in pm.event_rows:
                    ev.update(mid=mid, upto=None, by_user=None)
                    msg_events.append(ev)
                results[pm.op_index] = SendOutcome(
                    message=StoredMessage(
                        mid=mid,
                        conv=prow["conv"],
                        seq=prow["seq"],
                        sender=prow["sender"],
                        recipient=prow["recipient"],
                        cmid=prow["cmid"],
                        ts=prow["ts"],
                        type=prow["type"],
                        body=cast(_SendOp, batch[pm.op_index]).body,
                    ),
                    sender_cur=prow["sender_cur"],
                    recipient_cur=prow["recipient_cur"],
                    dup=False,
                )
            await conn.execute(events.insert(), msg_events)
        if receipt_rows:
            await conn.execute(events.insert(), receipt_rows)
        for i, j in dup_of.items():
            orig = cast(SendOutcome, results[j])
            results[i] = SendOutcome(orig.message, orig.sender_cur, orig.recipient_cur, dup=True)

        if cur_dirty:
            await conn.execute(
                update(users)
                .where(users.c.user_id == bindparam("b_user"))
                .values(last_cur=bindparam("b_cur")),
                [{"b_user": u, "b_cur": last_cur[u]} for u in sorted(cur_dirty)],
            )
        dirty_convs = sorted(c for c, s in conv_state.items() if s.dirty)
        if dirty_convs:
            await conn.execute(
                update(convs)
                .where(convs.c.conv == bindparam("b_conv"))
                .values(
                    last_seq=bindparam("b_seq"),
                    last_ts=bindparam("b_ts"),
                    last_mid=bindparam("b_mid"),
                ),
                [
                    {
                        "b_conv": c,
                        "b_seq": conv_state[c].last_seq,
                        "b_ts": conv_state[c].last_ts,
                        "b_mid": conv_state[c].last_mid,
                    }
                    for c in dirty_convs
                ],
            )
        dirty_members = sorted(k for k, m in member_state.items() if m.dirty)
        if dirty_members:
            await conn.execute(
                update(members)
                .where(
                    and_(
                        members.c.user_id == bindparam("b_user"),
                        members.c.conv == bindparam("b_conv"),
                    )
                )
                .values(
                    delivered=bindparam("b_delivered"),
                    read=bindparam("b_read"),
                    last_recv_seq=bindparam("b_recv"),
                    unread=bindparam("b_unread"),
                ),
                [
                    {
                        "b_user": u,
                        "b_conv": c,
                        "b_delivered": member_state[(u, c)].delivered,
                        "b_read": member_state[(u, c)].read,
                        "b_recv": member_state[(u, c)].last_recv_seq,
                        "b_unread": member_state[(u, c)].unread,
                    }
                    for (u, c) in dirty_members
                ],
            )
        recount = sorted(k for k, m in member_state.items() if m.recount)
        if recount:
            count = (
                select(func.count())
                .select_from(messages)
                .where(
                    messages.c.conv == members.c.conv,
                    messages.c.recipient == members.c.user_id,
                    messages.c.seq > members.c.read,
                )
                .scalar_subquery()
            )
            await conn.execute(
                update(members)
                .where(
                    and_(
                        members.c.user_id == bindparam("b_user"),
                        members.c.conv == bindparam("b_conv"),
                    )
                )
                .values(unread=count),
                [{"b_user": u, "b_conv": c} for (u, c) in recount],
            )
        return results

    # -------------------------------------------------------------------- reads

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        engine = self._reader
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
        """The stored message of (sender, cmid) as a dup outcome, or None."""
        async with self._read() as conn:
            row = (
                await conn.execute(
                    select(*_MSG_COLS, messages.c.sender_cur, messages.c.recipient_cur).where(
                        messages.c.sender == sender, messages.c.cmid == cmid
                    )
                )
            ).first()
        return None if row is None else _dup_from(row._mapping)

    async def last_cur(self, user: str) -> int:
        """The newest `cur` of the user's stream (0 for a user with no events)."""
        async with self._read() as conn:
            value = await conn.scalar(select(users.c.last_cur).where(users.c.user_id == user))
        return 0 if value is None else int(value)

    def _events_query(self, user: str, after: int, upto: int, limit: int) -> Select[Any]:
        m = messages.alias("m")
        return (
            select(
                events.c.cur,
                events.c.kind,
                events.c.conv,
                events.c.upto,
                events.c.by_user,
                events.c.ts,
                *(c.label("m_" + c.name) for c in m.c if c.name in {x.name for x in _MSG_COLS}),
            )
            .select_from(events.outerjoin(m, m.c.mid == events.c.mid))
            .where(events.c.user_id == user, events.c.cur > after, events.c.cur <= upto)
            .order_by(events.c.cur)
            .limit(limit)
        )

    @staticmethod
    def _event_from(user: str, mp: RowMapping) -> Event:
        if mp["kind"] == "msg":
            return Event(user=user, cur=int(mp["cur"]), message=_message_from(mp, "m_"))
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

    async def events(self, user: str, after: int, upto: int, limit: int) -> list[Event]:
        """Events of `user` with after < cur <= upto, in cur order, at most `limit`."""
        if limit <= 0 or upto <= after:
            return []
        async with self._read() as conn:
            rows = await conn.execute(self._events_query(user, after, upto, limit))
            return [self._event_from(user, mp) for mp in rows.mappings()]

    async def undelivered(self, user: str, after: int, upto: int, limit: int) -> list[Event]:
        """`msg` events of messages *to* `user` with after < cur <= upto whose seq is
        above the user's delivered watermark of their conversation, in cur order,
        at most `limit`."""
        if limit <= 0 or upto <= after:
            return []
        m = messages.alias("m")
        mb = members.alias("mb")
        q = (
            select(
                events.c.cur,
                *(c.label("m_" + c.name) for c in m.c if c.name in {x.name for x in _MSG_COLS}),
            )
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
        async with self._read() as conn:
            rows = await conn.execute(q)
            return [
                Event(user=user, cur=int(mp["cur"]), message=_message_from(mp, "m_"))
                for mp in rows.mappings()
            ]

    async def history(self, user: str, peer: str, before: int | None, limit: int) -> HistoryPage:
        """Messages between user and peer with seq < before (None: newest), newest first.

        `more` says older ones exist; `delivered` / `read` are the peer's
        watermarks (0 when the conversation does not exist).
        """
        c = conv_id(user, peer)
        conds: list[ColumnElement[bool]] = [messages.c.conv == c]
        if before is not None:
            conds.append(messages.c.seq < before)
        q = select(*_MSG_COLS).where(*conds).order_by(messages.c.seq.desc())
        q = q.limit(max(0, limit) + 1)
        async with self._read() as conn:
            rows = list(await conn.execute(q))
            wm = (
                await conn.execute(
                    select(members.c.delivered, members.c.read).where(
                        members.c.user_id == peer, members.c.conv == c
                    )
                )
            ).first()
        more = len(rows) > max(0, limit)
        msgs = [_message_from(r._mapping) for r in rows[: max(0, limit)]]
        return HistoryPage(
            conv=c,
            messages=msgs,
            more=more,
            delivered=0 if wm is None else int(wm.delivered),
            read=0 if wm is None else int(wm.read),
        )

    async def convs(self, user: str, limit: int) -> list[ConvSummary]:
        """The user's conversations, newest last message first (tie: stored later first)."""
        if limit <= 0:
            return []
        me = members.alias("me")
        other = members.alias("other")
        q = (
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
            .order_by(convs.c.last_ts.desc(), convs.c.last_mid.desc())
            .limit(limit)
        )
        async with self._read() as conn:
            rows = await conn.execute(q)
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
        """Raise StorageUnavailable unless the database answers (health checks)."""
        try:
            async with asyncio.timeout(_PING_TIMEOUT_S), self._read() as conn:
                await conn.execute(select(literal_column("1")))
        except TimeoutError as exc:
            raise StorageUnavailable("database ping timed out") from exc
