"""PostgreSQL: `chatd_batch_write_checked`, the group commit's write in one statement
of its own, checked against the rows the plan was computed from.

Two nodes that commit for the same people (every conversation between users on
different nodes) used to queue on each other's row locks, held from
`chatd_batch_read` through Python's plan, the write and the COMMIT: three round trips
through two busy event loops per batch (pg_stat_activity: mostly Lock/transactionid).
Now the read runs on its own (its locks end with it) and this function, run on its
own too, locks the users and convs rows (sorted, as the read does), checks that their
`last_cur` / `last_seq` are still those the plan saw (every change to a row the plan
uses moves one of them), writes, and commits: locks are held for one statement. If
another commit came in between it raises 40001, and the writer does the batch again
the locked way (storage/batch_pg.py).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_WRITE_ARGS = """
    m_mid bigint[], m_conv text[], m_seq bigint[], m_sender text[], m_recipient text[],
    m_cmid text[], m_ts bigint[], m_type text[], m_body bytea[], m_is_text boolean[],
    m_sender_cur bigint[], m_recipient_cur bigint[],
    e_user text[], e_cur bigint[], e_kind text[], e_conv text[], e_mid bigint[],
    e_upto bigint[], e_by text[], e_ts bigint[],
    u_user text[], u_cur bigint[],
    c_conv text[], c_seq bigint[], c_ts bigint[], c_mid bigint[],
    b_user text[], b_conv text[], b_delivered bigint[], b_read bigint[], b_recv bigint[],
    b_unread bigint[],
    r_user text[], r_conv text[]"""

CHECKED_WRITE = rf"""
CREATE OR REPLACE FUNCTION chatd_batch_write_checked(
    x_user text[], x_cur bigint[], x_conv text[], x_seq bigint[],{_WRITE_ARGS}
) RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM 1 FROM users WHERE user_id = ANY(x_user)
        ORDER BY user_id COLLATE "C" FOR UPDATE;
    IF EXISTS (SELECT 1 FROM unnest(x_user, x_cur) AS k(u, c)
                 JOIN users ON users.user_id = k.u WHERE users.last_cur <> k.c) THEN
        RAISE EXCEPTION 'chatd: a user row moved since the batch was planned'
            USING ERRCODE = '40001';
    END IF;
    PERFORM 1 FROM convs WHERE conv = ANY(x_conv) ORDER BY conv COLLATE "C" FOR UPDATE;
    IF EXISTS (SELECT 1 FROM unnest(x_conv, x_seq) AS k(c, s)
                 JOIN convs ON convs.conv = k.c WHERE convs.last_seq <> k.s) THEN
        RAISE EXCEPTION 'chatd: a conversation moved since the batch was planned'
            USING ERRCODE = '40001';
    END IF;
    PERFORM chatd_batch_write(
        m_mid, m_conv, m_seq, m_sender, m_recipient, m_cmid, m_ts, m_type, m_body,
        m_is_text, m_sender_cur, m_recipient_cur,
        e_user, e_cur, e_kind, e_conv, e_mid, e_upto, e_by, e_ts,
        u_user, u_cur, c_conv, c_seq, c_ts, c_mid,
        b_user, b_conv, b_delivered, b_read, b_recv, b_unread, r_user, r_conv);
END
$fn$
"""

_DROP = (
    "DROP FUNCTION IF EXISTS chatd_batch_write_checked(text[], bigint[], text[], bigint[], "
    "bigint[], text[], bigint[], text[], text[], "
    "text[], bigint[], text[], bytea[], boolean[], bigint[], bigint[], text[], bigint[], "
    "text[], text[], bigint[], bigint[], text[], bigint[], text[], bigint[], text[], bigint[], "
    "bigint[], bigint[], text[], text[], bigint[], bigint[], bigint[], bigint[], text[], text[])"
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(CHECKED_WRITE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_DROP)
