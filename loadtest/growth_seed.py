"""Seed a migrated, empty chatd database with many messages, fast, in the database itself.

Layout (deterministic): users u000000..; candidate c pairs user c % U with user
(c % U + 1 + 7919 * (c // U)) % U (never itself, each pair once); `heavy` (u000000)
is in the first `heavy_convs` conversations, each with another user. Message n (1..M) goes to
conversation n % C with seq n // C + 1, from its first or second person by turns.
Every message has its two `msg` events, numbered per user in message order, so each
stream is gap-free; counters, watermarks (delivered = read = everything, except
`heavy`'s: nothing delivered or read, so its catch-up is long) and unread counts match
the rows. The seeded messages' `sender_cur` / `recipient_cur` are 0 (they are read
only to answer a repeated cmid). Conversation ids are the store's own `conv_id`, made
in Python and sent with COPY; the rest is INSERT ... SELECT in SQL.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg

from storage.base import conv_id

__all__ = ["Shape", "conv_rows", "seed_postgres", "seed_sqlite"]


@dataclass(frozen=True, slots=True)
class Shape:
    users: int
    messages: int
    convs: int
    heavy_convs: int = 500

    def user(self, i: int) -> str:
        return f"u{i:06d}"

    @property
    def heavy(self) -> str:
        return self.user(0)


def conv_rows(shape: Shape) -> Iterator[tuple[int, str, str, str]]:
    """(index, conv, user_a, user_b) of every conversation, user_a < user_b: each pair
    once (a candidate pair already taken is skipped), so any prefix is the same."""
    u = shape.users
    seen: set[tuple[int, int]] = set()
    c = 0
    while len(seen) < shape.convs:
        if c < shape.heavy_convs:
            x, y = 0, c + 1
        else:
            x = c % u
            y = (x + 1 + 7919 * (c // u)) % u
        c += 1
        pair = (min(x, y), max(x, y))
        if x == y or pair in seen:
            continue
        seen.add(pair)
        a, b = shape.user(pair[0]), shape.user(pair[1])
        yield len(seen) - 1, conv_id(a, b), a, b


# The SQL after the seed conversations are in `seedconv(cidx, conv, a, b)`; {series} is
# the backend's 1..M row source, {body} a 60-byte body.
_STEPS = (
    "INSERT INTO users (user_id, last_cur) SELECT a, 0 FROM seedconv UNION "
    "SELECT b, 0 FROM seedconv",
    "INSERT INTO convs (conv, user_a, user_b) SELECT conv, a, b FROM seedconv",
    "INSERT INTO members (user_id, conv, peer) SELECT a, conv, b FROM seedconv "
    "UNION ALL SELECT b, conv, a FROM seedconv",
    "INSERT INTO messages (mid, conv, seq, sender, recipient, cmid, ts, type, body, is_text, "
    "sender_cur, recipient_cur) "
    "SELECT n, s.conv, n / {C} + 1, "
    "CASE WHEN (n / {C}) % 2 = 0 THEN s.a ELSE s.b END, "
    "CASE WHEN (n / {C}) % 2 = 0 THEN s.b ELSE s.a END, "
    "'seed-' || n, 1700000000000 + n, 'text', {body}, {true}, 0, 0 "
    "FROM {series} JOIN seedconv s ON s.cidx = n % {C}",
    "INSERT INTO events (user_id, cur, kind, conv, mid, ts) "
    "SELECT u, row_number() OVER (PARTITION BY u ORDER BY mid), 'msg', conv, mid, ts FROM "
    "(SELECT sender AS u, conv, mid, ts FROM messages UNION ALL "
    "SELECT recipient, conv, mid, ts FROM messages) x",
    "UPDATE users SET last_cur = x.n FROM "
    "(SELECT user_id, max(cur) AS n FROM events GROUP BY user_id) x "
    "WHERE users.user_id = x.user_id",
    "UPDATE convs SET last_seq = x.s, last_ts = x.t, last_mid = x.m FROM "
    "(SELECT conv, max(seq) AS s, max(ts) AS t, max(mid) AS m FROM messages GROUP BY conv) x "
    "WHERE convs.conv = x.conv",
    "UPDATE members SET last_recv_seq = x.s, delivered = x.s, read = x.s FROM "
    "(SELECT conv, recipient, max(seq) AS s FROM messages GROUP BY conv, recipient) x "
    "WHERE members.conv = x.conv AND members.user_id = x.recipient",
    "UPDATE members SET delivered = 0, read = 0, unread = (SELECT count(*) FROM messages m "
    "WHERE m.conv = members.conv AND m.recipient = members.user_id) WHERE user_id = '{heavy}'",
)


def _steps(shape: Shape, series: str, body: str, true: str) -> list[str]:
    return [
        s.replace("{C}", str(shape.convs))
        .replace("{series}", series)
        .replace("{body}", body)
        .replace("{true}", true)
        .replace("{heavy}", shape.heavy)
        for s in _STEPS
    ]


async def seed_postgres(dsn: str, shape: Shape, log: bool = True) -> None:
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        await conn.execute(
            "CREATE UNLOGGED TABLE seedconv (cidx int PRIMARY KEY, conv text, a text, b text)"
        )
        await conn.copy_records_to_table("seedconv", records=list(conv_rows(shape)))
        steps = _steps(
            shape,
            f"generate_series(1, {shape.messages}) AS n",
            "convert_to(repeat('x', 60), 'UTF8')",
            "true",
        )
        for sql in steps:
            if log:
                print(f"  seed: {sql[:70]}...", flush=True)
            await conn.execute(sql)
        await conn.execute(
            "SELECT setval(pg_get_serial_sequence('messages', 'mid'), $1)", shape.messages
        )
        await conn.execute("DROP TABLE seedconv")
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


def seed_sqlite(path: str, shape: Shape, log: bool = True) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("BEGIN")
        conn.execute("CREATE TEMP TABLE seedconv (cidx INTEGER PRIMARY KEY, conv, a, b)")
        conn.executemany("INSERT INTO seedconv VALUES (?, ?, ?, ?)", conv_rows(shape))
        series = (
            f"(WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g "
            f"WHERE n < {shape.messages}) SELECT n FROM g)"
        )
        for sql in _steps(shape, series, "CAST(printf('%.60c', 'x') AS BLOB)", "1"):
            if log:
                print(f"  seed: {sql[:70]}...", flush=True)
            conn.execute(sql)
        conn.execute("COMMIT")
        conn.execute("ANALYZE")
    finally:
        conn.close()
