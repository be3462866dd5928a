"""The tables of the SQL store (SQLAlchemy Core). Alembic migrations create them.

- `users`: one row per user with a stream; `last_cur` is the newest `cur`.
- `convs`: one row per conversation; the last message's `seq`, `ts`, `mid`.
- `members`: two rows per conversation (one per person): the person's
  watermarks, the `seq` of the last message *to* them, and their unread count.
- `messages`: every stored message, with its `cur` in both streams (so that a
  repeated `(sender, cmid)` answers the original without reading `events`).
- `events`: the streams. A `msg` event references its message by `mid`; a
  receipt event (`kind` = "delivered" | "read") holds `upto`, `by_user`, `ts`.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    UniqueConstraint,
)

__all__ = ["convs", "events", "members", "messages", "metadata", "users"]

USER_LEN = 64
CONV_LEN = 32
CMID_LEN = 64
TYPE_LEN = 64

#: BIGINT on PostgreSQL, INTEGER on SQLite (so that it is the rowid and autoincrements).
BigId = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

users = Table(
    "users",
    metadata,
    Column("user_id", String(USER_LEN), primary_key=True),
    Column("last_cur", BigInteger, nullable=False, server_default="0"),
)

convs = Table(
    "convs",
    metadata,
    Column("conv", String(CONV_LEN), primary_key=True),
    Column("user_a", String(USER_LEN), nullable=False),
    Column("user_b", String(USER_LEN), nullable=False),
    Column("last_seq", BigInteger, nullable=False, server_default="0"),
    Column("last_ts", BigInteger, nullable=False, server_default="0"),
    Column("last_mid", BigInteger, nullable=False, server_default="0"),
)

members = Table(
    "members",
    metadata,
    Column("user_id", String(USER_LEN), nullable=False),
    Column("conv", String(CONV_LEN), ForeignKey("convs.conv"), nullable=False),
    Column("peer", String(USER_LEN), nullable=False),
    Column("delivered", BigInteger, nullable=False, server_default="0"),
    Column("read", BigInteger, nullable=False, server_default="0"),
    Column("last_recv_seq", BigInteger, nullable=False, server_default="0"),
    Column("unread", BigInteger, nullable=False, server_default="0"),
    Column("last_ts", BigInteger, nullable=False, server_default="0"),
    Column("last_mid", BigInteger, nullable=False, server_default="0"),
    PrimaryKeyConstraint("user_id", "conv"),
)
"""`last_ts` / `last_mid`: the conversation's last message, kept by a trigger on `convs`
(migration 0003) and indexed per user, newest first: `convs` reads an index range."""

messages = Table(
    "messages",
    metadata,
    Column("mid", BigId, primary_key=True, autoincrement=True),
    Column("conv", String(CONV_LEN), ForeignKey("convs.conv"), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("sender", String(USER_LEN), nullable=False),
    Column("recipient", String(USER_LEN), nullable=False),
    Column("cmid", String(CMID_LEN), nullable=False),
    Column("ts", BigInteger, nullable=False),
    Column("type", String(TYPE_LEN), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("is_text", Boolean, nullable=False),
    Column("sender_cur", BigInteger, nullable=False),
    Column("recipient_cur", BigInteger, nullable=False),
    UniqueConstraint("conv", "seq"),
    UniqueConstraint("sender", "cmid"),
)

events = Table(
    "events",
    metadata,
    Column("user_id", String(USER_LEN), nullable=False),
    Column("cur", BigInteger, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("conv", String(CONV_LEN), nullable=False),
    Column("mid", BigInteger, ForeignKey("messages.mid"), nullable=True),
    Column("upto", BigInteger, nullable=True),
    Column("by_user", String(USER_LEN), nullable=True),
    Column("ts", BigInteger, nullable=False),
    PrimaryKeyConstraint("user_id", "cur"),
)
