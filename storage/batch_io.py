"""The statements of one group commit, behind one small interface, two implementations.

`storage.plan` decides *what* a batch writes (seq, cur, watermarks) once, in
Python; a `BatchIO` says *how* its dozen statements reach the database:

- `storage.batch_pg.PrefetchIO`: PostgreSQL, where steps 1-4 and step 6 are two
  server-side functions (migration 0002) called on a plain asyncpg connection;
  the IO answers the plan's reads from the first one's answer and gathers the
  rows of the second.
- `SqliteIO`: the stdlib `sqlite3` cursor of the SQLite writer thread. SQLite has
  one writer at a time (BEGIN IMMEDIATE), so it needs no row locks, and plain
  cursor calls cost a small fraction of SQLAlchemy's per-statement overhead,
  which was most of the CPU of a message on the embedded default.

Every row set in and out uses the schema's column names (storage/schema.py).
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from storage.schema import events, members, messages

__all__ = ["BatchIO", "Row", "SqliteCache", "SqliteIO"]

Row = Mapping[Any, Any]

_EVENT_COLS = tuple(c.name for c in events.c)
_MESSAGE_COLS = tuple(c.name for c in messages.c if c.name != "mid")


class BatchIO(Protocol):
    def pairs(
        self,
        table: str,
        key: tuple[str, str],
        cols: Sequence[str],
        pairs: Sequence[tuple[str, str]],
    ) -> list[Row]:
        """`cols` of the rows of `table` whose two-column `key` is in `pairs` (via its index)."""

    def lock_users(self, ids: Sequence[str]) -> list[Row]:
        """`user_id, last_cur` of the existing users among `ids` (sorted), locked for the tx."""

    def lock_convs(self, keys: Sequence[str]) -> list[Row]:
        """`conv, last_seq, last_ts, last_mid` of the existing convs among `keys`, locked."""

    def insert_missing(self, table: str, key: Sequence[str], rows: Sequence[Row]) -> None:
        """Insert `rows`, skipping those whose `key` exists (ON CONFLICT DO NOTHING)."""

    def insert_messages(self, rows: Sequence[Row]) -> list[int]:
        """Insert messages; their new `mid`s in row order."""

    def insert_events(self, rows: Sequence[Row]) -> None: ...

    def update_user_curs(self, rows: Sequence[Row]) -> None:
        """rows: {b_user, b_cur}."""

    def update_convs(self, rows: Sequence[Row]) -> None:
        """rows: {b_conv, b_seq, b_ts, b_mid}."""

    def update_members(self, rows: Sequence[Row]) -> None:
        """rows: {b_user, b_conv, b_delivered, b_read, b_recv, b_unread}."""

    def recount_unread(self, rows: Sequence[Row]) -> None:
        """rows: {b_user, b_conv}: unread := messages to the user above the user's read mark."""


def _pad(n: int) -> int:
    """Round up to a power of two, so a handful of statement shapes serve every batch."""
    size = 1
    while size < n:
        size *= 2
    return size


_MAX_CHUNK = 64
"""Rows per multi-row statement at most (64 x 12 columns stays under SQLite's oldest
limit of 999 variables)."""


@functools.lru_cache(maxsize=64)
def _chunk_sql(template: str, cols: tuple[str, ...], size: int) -> str:
    row = "(" + ", ".join("?" * len(cols)) + ")"
    return template.format(cols=", ".join(cols), values=", ".join([row] * size))


def _values_join_sql(table: str, key: tuple[str, str], cols: Sequence[str], size: int) -> str:
    """SQLite scans a whole table for a multi-row row-value IN; a join with a VALUES
    list (of `size` pairs) uses the index on `key`."""
    ka, kb = key
    values = ", ".join("(?, ?)" for _ in range(size))
    select_list = ", ".join(f't."{n}"' for n in cols)
    return (
        f"SELECT DISTINCT {select_list} FROM (VALUES {values}) AS v "
        f'JOIN "{table}" AS t ON t."{ka}" = v.column1 AND t."{kb}" = v.column2'
    )


# ------------------------------------------------------------------------ sqlite3


class SqliteCache:
    """The counters of the SQLite writer (users, convs, members rows), kept between batches.

    SQLite has one writer, so the rows a batch reads were written by the previous
    batches of this same connection: the writer keeps them here and skips the
    SELECTs. Only the writer thread touches it. Reads and writes of a batch go to
    an overlay that `commit` merges after COMMIT and `rollback` drops, so the
    cache never holds an uncommitted row. Another connection's commit (a second
    process on the file, a test, an operator's `sqlite3`) moves `PRAGMA
    data_version`, and the next batch starts from an empty cache. Each table keeps
    at most `max_rows` rows; a full one starts over.
    """

    __slots__ = ("_mid", "_mid_next", "_overlay", "_stale", "_tables", "data_version", "max_rows")

    def __init__(self, max_rows: int = 100_000) -> None:
        self.max_rows = max_rows
        self.data_version: int | None = None
        self._tables: dict[str, dict[Any, dict[str, Any]]] = {
            "users": {},
            "convs": {},
            "members": {},
        }
        self._overlay: dict[str, dict[Any, dict[str, Any]]] = {t: {} for t in self._tables}
        self._stale: list[tuple[str, Any]] = []
        self._mid: int | None = None
        """The next message id (committed), when known."""
        self._mid_next: int | None = None

    def begin(self, data_version: int) -> None:
        """Start a batch; `data_version` as read inside its transaction."""
        if data_version != self.data_version:
            self.clear()
            self.data_version = data_version
        self.rollback()

    def mid(self) -> int | None:
        """The next message id, when known."""
        return self._mid_next if self._mid_next is not None else self._mid

    def next_mid(self, mid: int) -> None:
        """This batch used the ids below `mid`."""
        self._mid_next = mid

    def get(self, table: str, key: Any) -> dict[str, Any] | None:
        row = self._overlay[table].get(key)
        if row is None:
            row = self._tables[table].get(key)
        return row

    def put(self, table: str, key: Any, row: dict[str, Any]) -> None:
        """A row as this batch read or wrote it."""
        self._overlay[table][key] = row

    def update(self, table: str, key: Any, **values: Any) -> None:
        """Change a row this batch read (a copy: the committed one stays until `commit`)."""
        row = self.get(table, key)
        if row is not None:
            row = dict(row)
            row.update(values)
            self._overlay[table][key] = row

    def forget(self, table: str, key: Any) -> None:
        """A row this batch changed in SQL: read it again next time."""
        self._overlay[table].pop(key, None)
        self._stale.append((table, key))

    def commit(self) -> None:
        for name, overlay in self._overlay.items():
            if overlay:
                table = self._tables[name]
                if len(table) + len(overlay) > self.max_rows:
                    table.clear()
                table.update(overlay)
                overlay.clear()
        for name, key in self._stale:
            self._tables[name].pop(key, None)
        self._stale.clear()
        if self._mid_next is not None:
            self._mid = self._mid_next
            self._mid_next = None

    def rollback(self) -> None:
        for o in self._overlay.values():
            o.clear()
        self._stale.clear()
        self._mid_next = None

    def clear(self) -> None:
        for t in self._tables.values():
            t.clear()
        self._mid = None
        self.rollback()


_MEMBER_COLS = tuple(c.name for c in members.c)
_KEYS: dict[str, tuple[str, ...]] = {
    "users": ("user_id",),
    "convs": ("conv",),
    "members": ("user_id", "conv"),
}


class SqliteIO:
    """Plain cursor calls on the SQLite writer's own connection (inside BEGIN IMMEDIATE).

    The users / convs / members rows come from the writer's `SqliteCache` when it
    has them; only the missing ones are read."""

    def __init__(self, conn: sqlite3.Connection, cache: SqliteCache) -> None:
        self._cur = conn.cursor()
        self._cache = cache

    def _rows(self, sql: str, params: Sequence[Any]) -> list[Row]:
        self._cur.execute(sql, params)
        names = [d[0] for d in self._cur.description]
        return [dict(zip(names, r, strict=True)) for r in self._cur.fetchall()]

    def _cached(
        self, table: str, keys: Sequence[Any], load: Callable[[Sequence[Any]], list[Row]]
    ) -> list[Row]:
        """The rows of `keys`: the cached ones, and `load(missing)` (then cached) for the rest."""
        cache = self._cache
        out: list[Row] = []
        missing: list[Any] = []
        for k in keys:
            hit = cache.get(table, k)
            if hit is None:
                missing.append(k)
            else:
                out.append(hit)
        if missing:
            key_cols = _KEYS[table]
            for row in load(missing):
                key = row[key_cols[0]] if len(key_cols) == 1 else tuple(row[c] for c in key_cols)
                cache.put(table, key, dict(row))
                out.append(row)
        return out

    def pairs(
        self,
        table: str,
        key: tuple[str, str],
        cols: Sequence[str],
        pairs: Sequence[tuple[str, str]],
    ) -> list[Row]:
        if table == "members":
            # Whole rows (a superset of `cols`), so that the cache can answer any columns.
            return self._cached(
                "members", pairs, lambda miss: self._pairs(table, key, _MEMBER_COLS, miss)
            )
        return self._pairs(table, key, cols, pairs)

    def _pairs(
        self,
        table: str,
        key: tuple[str, str],
        cols: Sequence[str],
        pairs: Sequence[tuple[str, str]],
    ) -> list[Row]:
        size = _pad(len(pairs))
        flat: list[str] = []
        for x, y in list(pairs) + [pairs[-1]] * (size - len(pairs)):
            flat.append(x)
            flat.append(y)
        return self._rows(_values_join_sql(table, key, cols, size), flat)

    def _in_list(self, sql: str, keys: Sequence[str]) -> list[Row]:
        size = _pad(len(keys))
        padded = list(keys) + [keys[-1]] * (size - len(keys))
        return self._rows(sql.replace("(?)", "(" + ", ".join("?" * size) + ")"), padded)

    def lock_users(self, ids: Sequence[str]) -> list[Row]:
        return self._cached(
            "users",
            ids,
            lambda miss: self._in_list(
                "SELECT user_id, last_cur FROM users WHERE user_id IN (?) ORDER BY user_id", miss
            ),
        )

    def lock_convs(self, keys: Sequence[str]) -> list[Row]:
        return self._cached(
            "convs",
            keys,
            lambda miss: self._in_list(
                "SELECT conv, last_seq, last_ts, last_mid FROM convs WHERE conv IN (?) "
                "ORDER BY conv",
                miss,
            ),
        )

    def insert_missing(self, table: str, key: Sequence[str], rows: Sequence[Row]) -> None:
        cols = list(rows[0])
        sql = (
            f'INSERT INTO "{table}" ({", ".join(cols)}) '
            f"VALUES ({', '.join(':' + c for c in cols)}) "
            f"ON CONFLICT ({', '.join(key)}) DO NOTHING"
        )
        self._cur.executemany(sql, rows)

    def insert_messages(self, rows: Sequence[Row]) -> list[int]:
        # One writer: the next mids are known, so one multi-row INSERT needs no RETURNING.
        first = self._next_mid()
        mids = list(range(first, first + len(rows)))
        self._write_rows(
            "INSERT INTO messages ({cols}) VALUES {values}",
            ("mid", *_MESSAGE_COLS),
            [{**row, "mid": mid} for row, mid in zip(rows, mids, strict=True)],
        )
        self._cache.next_mid(first + len(rows))
        return mids

    def _next_mid(self) -> int:
        known = self._cache.mid()
        if known is not None:
            return known
        self._cur.execute("SELECT coalesce(max(mid), 0) + 1 FROM messages")
        return int(self._cur.fetchone()[0])

    def insert_events(self, rows: Sequence[Row]) -> None:
        self._write_rows("INSERT INTO events ({cols}) VALUES {values}", _EVENT_COLS, rows)

    def update_user_curs(self, rows: Sequence[Row]) -> None:
        self._write_rows(
            "UPDATE users SET last_cur = v.column2 FROM (VALUES {values}) AS v "
            "WHERE users.user_id = v.column1",
            ("b_user", "b_cur"),
            rows,
        )
        for r in rows:
            self._cache.update("users", r["b_user"], last_cur=r["b_cur"])

    def update_convs(self, rows: Sequence[Row]) -> None:
        self._write_rows(
            "UPDATE convs SET last_seq = v.column2, last_ts = v.column3, last_mid = v.column4 "
            "FROM (VALUES {values}) AS v WHERE convs.conv = v.column1",
            ("b_conv", "b_seq", "b_ts", "b_mid"),
            rows,
        )
        for r in rows:
            self._cache.update(
                "convs",
                r["b_conv"],
                last_seq=r["b_seq"],
                last_ts=r["b_ts"],
                last_mid=r["b_mid"],
            )

    def update_members(self, rows: Sequence[Row]) -> None:
        self._write_rows(
            "UPDATE members SET delivered = v.column3, read = v.column4, "
            "last_recv_seq = v.column5, unread = v.column6 FROM (VALUES {values}) AS v "
            "WHERE members.user_id = v.column1 AND members.conv = v.column2",
            ("b_user", "b_conv", "b_delivered", "b_read", "b_recv", "b_unread"),
            rows,
        )
        for r in rows:
            self._cache.update(
                "members",
                (r["b_user"], r["b_conv"]),
                delivered=r["b_delivered"],
                read=r["b_read"],
                last_recv_seq=r["b_recv"],
                unread=r["b_unread"],
            )

    def _write_rows(self, template: str, cols: Sequence[str], rows: Sequence[Row]) -> None:
        """Many rows in a few statements: `template` with `{cols}` and `{values}`, run once
        per power-of-two chunk of rows (a handful of statement shapes for any batch), so
        the writer makes a few statement steps per batch instead of one per row."""
        start = 0
        n = len(rows)
        while start < n:
            size = min(_MAX_CHUNK, 1 << ((n - start).bit_length() - 1))
            sql = _chunk_sql(template, tuple(cols), size)
            params = [r[c] for r in rows[start : start + size] for c in cols]
            self._cur.execute(sql, params)
            start += size

    def recount_unread(self, rows: Sequence[Row]) -> None:
        self._cur.executemany(
            "UPDATE members SET unread = (SELECT count(*) FROM messages "
            "WHERE messages.conv = members.conv AND messages.recipient = members.user_id "
            "AND messages.seq > members.read) "
            "WHERE user_id = :b_user AND conv = :b_conv",
            rows,
        )
        for r in rows:
            self._cache.forget("members", (r["b_user"], r["b_conv"]))
