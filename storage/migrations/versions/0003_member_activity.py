"""members.last_ts / last_mid: each person's copy of their conversation's last activity,
indexed, so that `convs` is an index range scan of one user's rows, newest first, and
not a sort of all their conversations (50,000 conversations took about 1 s).

A trigger on `convs` keeps the copies: whenever a conversation's last message moves,
both members rows follow in the same transaction, whichever writer moved it (the
SQLite plan, or PostgreSQL's chatd_batch_write).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INDEX = "ix_members_user_id_last_ts_last_mid"

_PG_TRIGGER = (
    r"""
CREATE OR REPLACE FUNCTION chatd_member_activity() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    UPDATE members SET last_ts = NEW.last_ts, last_mid = NEW.last_mid
     WHERE (user_id = NEW.user_a OR user_id = NEW.user_b) AND conv = NEW.conv;
    RETURN NULL;
END
$fn$
""",
    "CREATE TRIGGER chatd_member_activity AFTER UPDATE OF last_ts, last_mid ON convs "
    "FOR EACH ROW WHEN (NEW.last_mid <> OLD.last_mid) EXECUTE FUNCTION chatd_member_activity()",
)

_SQLITE_TRIGGER = """
CREATE TRIGGER chatd_member_activity AFTER UPDATE OF last_ts, last_mid ON convs
FOR EACH ROW WHEN NEW.last_mid <> OLD.last_mid
BEGIN
    UPDATE members SET last_ts = NEW.last_ts, last_mid = NEW.last_mid
     WHERE user_id IN (NEW.user_a, NEW.user_b) AND conv = NEW.conv;
END
"""


def upgrade() -> None:
    with op.batch_alter_table("members") as batch:
        batch.add_column(sa.Column("last_ts", sa.BigInteger, nullable=False, server_default="0"))
        batch.add_column(sa.Column("last_mid", sa.BigInteger, nullable=False, server_default="0"))
    op.execute(
        "UPDATE members SET last_ts = (SELECT c.last_ts FROM convs c WHERE c.conv = members.conv),"
        " last_mid = (SELECT c.last_mid FROM convs c WHERE c.conv = members.conv)"
    )
    op.create_index(
        _INDEX, "members", ["user_id", sa.text("last_ts DESC"), sa.text("last_mid DESC")]
    )
    if op.get_bind().dialect.name == "postgresql":
        for stmt in _PG_TRIGGER:
            op.execute(stmt)
    else:
        op.execute(_SQLITE_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS chatd_member_activity ON convs")
        op.execute("DROP FUNCTION IF EXISTS chatd_member_activity()")
    else:
        op.execute("DROP TRIGGER IF EXISTS chatd_member_activity")
    op.drop_index(_INDEX, "members")
    with op.batch_alter_table("members") as batch:
        batch.drop_column("last_mid")
        batch.drop_column("last_ts")
