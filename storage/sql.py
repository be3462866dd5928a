"""`SqlStore`: the Store on SQLAlchemy 2 asyncio Core, SQLite (aiosqlite) or PostgreSQL (asyncpg).

Group commit
------------
One writer task owns every write. `send()` / `mark()` queue an op with a
future and await it (`send_soon()` / `mark_soon()` return that future). The
writer takes the first op, drains the ops already queued (up to `max_batch`),
runs them all in ONE transaction, commits, then resolves the futures in queue
order. It starts a transaction at most once per `commit_window`: an op that
finds the writer idle for a whole window is committed at once (no added
latency when the load is light), while under load the ops of each window share
one transaction (fewer commits: less CPU and disk per message). The number of
statements per batch does not grow with its size (executemany for the rows):

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

On SQLite the writer keeps the users / convs / members rows it read or wrote
between batches (`batch_io.SqliteCache`): steps 1, 2 and 4 read only the rows
it does not hold yet. It is dropped when another connection has committed
(`PRAGMA data_version`) and after any failed batch. Step 6 there is one
multi-row statement per table and chunk (INSERT ... VALUES, UPDATE ... FROM
VALUES), with the message ids assigned by the writer, which is the only one.

A validation failure of one op (NotAMember, UptoTooHigh) is decided in step 5
and fails only that op. A transaction that fails because the database refused a
value (`storage.errors.is_data_error`: SQLSTATE class 22/23, an int over 64 bits,
...) is run again one op per transaction, so that only the refused op fails
(StorageRejected) and one bad write never fails its neighbours. Any other failed
transaction fails every op of the batch with StorageUnavailable (nothing was
stored) and the writer goes on with the next batch. A PostgreSQL deadlock /
serialization failure / lost unique race is retried a few times first.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, cast

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    event,
    literal_column,
    select,
)
from sqlalchemy.engine import Engine, RowMapping
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
    StorageRejected,
    StorageUnavailable,
    StoredMessage,
    StoreStats,
    UptoTooHigh,
    conv_id,
)
from storage.batch_io import BatchIO, PostgresIO, SqliteCache, SqliteIO
from storage.errors import RETRYABLE_SQLSTATES, is_data_error, is_driver_error, sqlstate
from storage.schema import convs, events, members, messages, users
from storage.urls import normalize_url, sqlite_path

__all__ = ["SqlStore"]

log = logging.getLogger("chatd.storage")

_RETRIES = 5
_SQLITE_MIN = (3, 33, 0)
_SQLITE_BUSY_TIMEOUT_MS = 10_000
_PING_TIMEOUT_S = 5.0
_PG_CONNECT_TIMEOUT_S = 10.0


def _sqlite_pragmas(dbapi_conn: Any) -> None:
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _cur_map(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    return {r["user_id"]: int(r["last_cur"]) for r in rows}


def _conv_map(rows: Sequence[Mapping[str, Any]]) -> dict[str, _Conv]:
    return {
        r["conv"]: _Conv(int(r["last_seq"]), int(r["last_ts"]), int(r["last_mid"])) for r in rows
    }


def _sqlite_reader_setup(engine: Engine) -> None:
    """The readers' pragmas (see `_sqlite_pragmas`); their transactions opened with a
    plain BEGIN (writes go through the writer thread's own connection)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: ConnectionPoolEntry) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        _sqlite_pragmas(dbapi_conn)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")


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


def _answer_failed(ops: Sequence[_Op], make: Callable[[], BaseException]) -> None:
    """Answer every op of `ops` not answered yet with a new exception from `make`."""
    for op in ops:
        if not op.future.done():
            op.future.set_exception(make())


def _fail_ops(ops: Sequence[_Op], why: str) -> None:
    """Answer every op of `ops` not answered yet with StorageUnavailable(why)."""
    _answer_failed(ops, lambda: StorageUnavailable(why))


def _rejected(error: BaseException) -> StorageRejected:
    """StorageRejected for a write whose data the database refused with `error`."""
    rejected = StorageRejected(f"the database refused the write: {type(error).__name__}")
    rejected.__cause__ = error
    return rejected


def _encode_body(body: str | bytes) -> tuple[bytes, bool]:
    if isinstance(body, str):
        return body.encode("utf-8"), True
    return bytes(body), False


def _decode_body(body: bytes, is_text: bool) -> str | bytes:
    return bytes(body).decode("utf-8") if is_text else bytes(body)


def _message_from(m: Mapping[Any, Any], prefix: str = "") -> StoredMessage:
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


def _dup_from(m: Mapping[Any, Any]) -> SendOutcome:
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
    transaction at most. `commit_window`: seconds between the starts of two
    transactions at least (0: commit as soon as the writer is free); ops that
    arrive in between join the next one. `pool_size`: connections for reads (the
    writer has its own single connection).
    """

    BATCH_SIZE_BOUNDS: ClassVar[tuple[int, ...]] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    """Upper bounds of the buckets of `batch_sizes` (ops per transaction)."""

    def __init__(
        self,
        url: str,
        *,
        group_commit: bool = True,
        max_batch: int = 256,
        pool_size: int = 10,
        commit_window: float = 0.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.url = normalize_url(url)
        self.group_commit = group_commit
        self.max_batch = max_batch if group_commit else 1
        self.commit_window = commit_window if group_commit else 0.0
        """Seconds between the starts of two transactions at least: under load the
        writes of a window share one transaction; after an idle window a write
        is committed at once."""
        self.pool_size = pool_size
        self._sqlite = self.url.startswith("sqlite")
        self._reader: AsyncEngine | None = None
        self._writer_engine: AsyncEngine | None = None
        self._sqlite_conn: sqlite3.Connection | None = None
        """The SQLite writer's connection: used only on the `_sqlite_exec` thread."""
        self._sqlite_exec: ThreadPoolExecutor | None = None
        self._sqlite_cache = SqliteCache()
        """The writer's users / convs / members rows between batches (writer thread only)."""
        self._queue: asyncio.Queue[_Op | None] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None
        self._closing = False
        #: Counters for metrics / tests: ops in the committed batches, and the batches
        #: by size: `batch_sizes[i]` counts those with
        #: BATCH_SIZE_BOUNDS[i-1] < ops <= BATCH_SIZE_BOUNDS[i] (the last: above all).
        self.batched_ops = 0
        self.batch_sizes = [0] * (len(self.BATCH_SIZE_BOUNDS) + 1)

    @property
    def batches(self) -> int:
        """Batches (transactions) committed."""
        return sum(self.batch_sizes)

    # ---------------------------------------------------------------- lifecycle

    def _make_engine(self, *, writer: bool) -> AsyncEngine:
        size = 1 if writer else max(1, self.pool_size)
        if self._sqlite:
            engine = create_async_engine(self.url, pool_size=size, max_overflow=0)
            _sqlite_reader_setup(engine.sync_engine)
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
        if self._sqlite and sqlite3.sqlite_version_info < _SQLITE_MIN:
            raise StorageUnavailable(
                f"chatd needs SQLite {'.'.join(map(str, _SQLITE_MIN))} or newer "
                f"(UPDATE ... FROM); this Python has {sqlite3.sqlite_version}"
            )
        self._reader = self._make_engine(writer=False)
        if self._sqlite:
            self._sqlite_exec = ThreadPoolExecutor(1, thread_name_prefix="chatd-sqlite-writer")
        else:
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
                self._fail_queued()  # also when this close() is cancelled
        self._fail_queued()
        await self._dispose()

    async def _dispose(self) -> None:
        for engine in (self._reader, self._writer_engine):
            if engine is not None:
                with contextlib.suppress(Exception):
                    await engine.dispose()
        self._reader = None
        self._writer_engine = None
        pool, self._sqlite_exec = self._sqlite_exec, None
        if pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(pool, self._close_sqlite_conn)
            pool.shutdown(wait=True)

    def _fail_queued(self) -> None:
        while True:
            try:
                op = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if op is not None:
                _fail_ops([op], "store closed")

    # ------------------------------------------------------------------- writes

    def _submit(self, op: _Op) -> None:
        task = self._writer_task
        if task is None or self._closing or task.done():
            raise StorageUnavailable("store is not open")
        self._queue.put_nowait(op)

    def send(
        self, sender: str, recipient: str, cmid: str, body: str | bytes, type: str, ts: int
    ) -> asyncio.Future[SendOutcome]:
        """Store a message durably, once per (sender, cmid) (see `Store.send`): queued at
        once, the future ends when it is committed. A repeated (sender, cmid) is a dup
        also when both are in one batch. If the caller stops waiting, the message may
        still be stored (a retry is a dup)."""
        fut: asyncio.Future[SendOutcome] = asyncio.get_running_loop().create_future()
        self._submit(_SendOp(sender, recipient, cmid, body, type, ts, fut))
        return fut

    def mark(
        self, user: str, conv: str, kind: MarkKind, upto: int, ts: int
    ) -> asyncio.Future[MarkOutcome]:
        """Move `user`'s watermark of `kind` in `conv` forward, durably (see `Store.mark`).

        NotAMember also covers a conversation that does not exist (yet).
        """
        if kind not in ("delivered", "read"):
            raise ValueError(f"bad mark kind: {kind!r}")
        fut: asyncio.Future[MarkOutcome] = asyncio.get_running_loop().create_future()
        self._submit(_MarkOp(user, conv, kind, upto, ts, fut))
        return fut

    def stats(self) -> StoreStats:
        return StoreStats(self.batched_ops, self.BATCH_SIZE_BOUNDS, tuple(self.batch_sizes))

    async def _writer(self) -> None:
        queue = self._queue
        loop = asyncio.get_running_loop()
        stop = False
        started = -math.inf
        while not stop:
            first = await queue.get()
            if first is None:
                break
            batch: list[_Op] = [first]
            # Paced: one transaction per window at most; the ops of the rest of the
            # window join this one. After an idle window, `wait` <= 0: no delay.
            wait = started + self.commit_window - loop.time()
            if wait > 0.0 and queue.qsize() < self.max_batch:
                try:
                    await asyncio.sleep(wait)
                except asyncio.CancelledError:
                    _fail_ops(batch, "store closed")  # taken out of the queue already
                    raise
            started = loop.time()
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
        cancelled = False
        for attempt in range(_RETRIES):
            try:
                results = await self._commit_batch(batch)
                error = None
                break
            except asyncio.CancelledError:
                error = StorageUnavailable("store closed")
                cancelled = True
                break
            except Exception as exc:
                error = exc
                code = sqlstate(exc)
                if code in RETRYABLE_SQLSTATES and attempt + 1 < _RETRIES:
                    log.info("storage batch retry after %s (attempt %d)", code, attempt + 1)
                    continue
                break
        if error is not None:
            refused = is_data_error(error)
            if is_driver_error(error) or isinstance(error, StorageUnavailable) or refused:
                log.warning("storage batch of %d failed: %s", len(batch), type(error).__name__)
            else:
                log.exception("storage batch of %d failed unexpectedly", len(batch), exc_info=error)
            if cancelled:  # the writer is being stopped: answer the batch, then stop
                _fail_ops(batch, "store closed")
                raise asyncio.CancelledError
            if refused:
                if len(batch) > 1:
                    await self._run_alone(batch)
                else:
                    _answer_failed(batch, lambda: _rejected(error))
                return
            _fail_ops(batch, f"transaction failed: {type(error).__name__}")
            return
        self.batched_ops += len(batch)
        self.batch_sizes[bisect.bisect_left(self.BATCH_SIZE_BOUNDS, len(batch))] += 1
        for op, res in zip(batch, results, strict=True):
            if op.future.done():
                continue
            if isinstance(res, BaseException):
                op.future.set_exception(res)
            else:
                op.future.set_result(res)  # type: ignore[arg-type]

    async def _run_alone(self, batch: list[_Op]) -> None:
        """The database refused a value of `batch`: one transaction per op, in queue
        order, so that only the op it refuses fails (StorageRejected) and the others
        are stored as if their batch had been committed."""
        log.warning(
            "storage batch of %d refused a value: committing its writes one by one", len(batch)
        )
        for i, op in enumerate(batch):
            try:
                await self._run_batch([op])
            except asyncio.CancelledError:
                _fail_ops(batch[i + 1 :], "store closed")
                raise
            fut = op.future
            if (
                fut.done()
                and not fut.cancelled()
                and isinstance(fut.exception(), StorageUnavailable)
            ):
                # The database itself failed meanwhile: one attempt per op would stall
                # the writer an outage's timeout per op. The rest fail now, unstored.
                _fail_ops(batch[i + 1 :], "transaction failed")
                return

    async def _commit_batch(self, batch: Sequence[_Op]) -> list[object]:
        """One transaction for the batch. SQLite: the whole transaction in one hop to the
        writer thread, on its own stdlib sqlite3 connection. PostgreSQL: the same
        `_apply` through `run_sync` on the async (asyncpg) connection."""
        if self._sqlite:
            if self._sqlite_exec is None:
                raise StorageUnavailable("store is not open")
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._sqlite_exec, self._commit_batch_sync, batch)
        engine = self._writer_engine
        if engine is None:
            raise StorageUnavailable("store is not open")
        async with engine.connect() as conn, conn.begin():
            return await conn.run_sync(lambda sync_conn: self._apply(PostgresIO(sync_conn), batch))

    def _commit_batch_sync(self, batch: Sequence[_Op]) -> list[object]:
        """Runs on the SQLite writer thread (the only user of `_sqlite_conn`)."""
        conn = self._sqlite_conn
        if conn is None:
            path = sqlite_path(self.url)
            assert path is not None
            conn = self._sqlite_conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False
            )
            _sqlite_pragmas(conn)
        cache = self._sqlite_cache
        conn.execute("BEGIN IMMEDIATE")
        try:
            cache.begin(conn.execute("PRAGMA data_version").fetchone()[0])
            results = self._apply(SqliteIO(conn, cache), batch)
            conn.execute("COMMIT")
        except BaseException:
            cache.clear()  # whatever the failure: read every row again
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        cache.commit()
        return results

    def _close_sqlite_conn(self) -> None:
        conn, self._sqlite_conn = self._sqlite_conn, None
        self._sqlite_cache.clear()
        if conn is not None:
            conn.close()

    def _apply(self, io: BatchIO, batch: Sequence[_Op]) -> list[object]:
        sends = [op for op in batch if isinstance(op, _SendOp)]
        marks = [op for op in batch if isinstance(op, _MarkOp)]

        # 1. the marking users' member rows: who is the peer (membership never changes).
        mark_peer: dict[tuple[str, str], str] = {}
        if marks:
            keys = sorted({(op.user, op.conv) for op in marks})
            peer_rows = io.pairs("members", ("user_id", "conv"), ("user_id", "conv", "peer"), keys)
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
            last_cur = _cur_map(io.lock_users(sorted(user_ids)))
            missing = sorted(user_ids - last_cur.keys())
            if missing:
                io.insert_missing(
                    "users", ["user_id"], [{"user_id": u, "last_cur": 0} for u in missing]
                )
                last_cur.update(_cur_map(io.lock_users(missing)))
        cur_dirty: set[str] = set()

        # 3. (sender, cmid) already stored.
        stored: dict[tuple[str, str], SendOutcome] = {}
        if sends:
            pairs = sorted({(s.sender, s.cmid) for s in sends})
            dup_rows = io.pairs("messages", ("sender", "cmid"), _DUP_COL_NAMES, pairs)
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
            conv_state = _conv_map(io.lock_convs(conv_keys))
            new_convs = sorted(set(send_convs) - conv_state.keys())
            if new_convs:
                conv_rows = []
                member_rows = []
                for c in new_convs:
                    a, b = sorted(send_convs[c])
                    conv_rows.append({"conv": c, "user_a": a, "user_b": b})
                    member_rows.append({"user_id": a, "conv": c, "peer": b})
                    member_rows.append({"user_id": b, "conv": c, "peer": a})
                io.insert_missing("convs", ["conv"], conv_rows)
                io.insert_missing("members", ["user_id", "conv"], member_rows)
                conv_state.update(_conv_map(io.lock_convs(new_convs)))
            member_keys: set[tuple[str, str]] = set()
            for c, (a, b) in send_convs.items():
                member_keys.add((a, c))
                member_keys.add((b, c))
            member_keys.update(mark_peer)
            member_rows_now = io.pairs(
                "members", ("user_id", "conv"), _MEMBER_COL_NAMES, sorted(member_keys)
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
                        results[i] = MarkOutcome(None, peer=peer, watermark=member.delivered)
                        continue
                    member.delivered = capped
                else:
                    if capped <= member.read:
                        results[i] = MarkOutcome(None, peer=peer, watermark=member.read)
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
                    watermark=capped,
                )

        # 6. write.
        if pending:
            mids = io.insert_messages([p.row for p in pending])
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
            io.insert_events(msg_events)
        if receipt_rows:
            io.insert_events(receipt_rows)
        for i, j in dup_of.items():
            orig = cast(SendOutcome, results[j])
            results[i] = SendOutcome(orig.message, orig.sender_cur, orig.recipient_cur, dup=True)

        if cur_dirty:
            io.update_user_curs([{"b_user": u, "b_cur": last_cur[u]} for u in sorted(cur_dirty)])
        dirty_convs = sorted(c for c, s in conv_state.items() if s.dirty)
        if dirty_convs:
            io.update_convs(
                [
                    {
                        "b_conv": c,
                        "b_seq": conv_state[c].last_seq,
                        "b_ts": conv_state[c].last_ts,
                        "b_mid": conv_state[c].last_mid,
                    }
                    for c in dirty_convs
                ]
            )
        dirty_members = sorted(k for k, m in member_state.items() if m.dirty)
        if dirty_members:
            io.update_members(
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
                ]
            )
        recount = sorted(k for k, m in member_state.items() if m.recount)
        if recount:
            io.recount_unread([{"b_user": u, "b_conv": c} for (u, c) in recount])
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
