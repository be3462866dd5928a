"""PostgreSQL: `chatd_batch_write_checked`, the group commit's write in one statement
of its own, checked against the rows the plan was computed from; `chatd_batch_read2`
and `chatd_create_rows`, which create missing rows apart from any lock.

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

`chatd_batch_read` (0002) created the missing users, convs and members rows between
two rounds of row locks: a transaction could then hold a new row's key and wait for an
old row that another held while it waited for that key (PostgreSQL's deadlock
detector broke it after deadlock_timeout, 1 s: loadtest/blink.py saw it when two nodes
start on new users). `chatd_batch_read2` creates nothing: it answers which rows are
missing, `chatd_create_rows` inserts them in a transaction of its own (sorted, holding
no other lock), and the read is done again. Old nodes keep calling the 0002 function
during a rolling upgrade.

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

READ2 = r"""
CREATE OR REPLACE FUNCTION chatd_batch_read2(
    s_sender text[], s_recipient text[], s_cmid text[], s_conv text[],
    m_user text[], m_conv text[]
) RETURNS json LANGUAGE plpgsql AS $fn$
DECLARE
    v_users text[];
    v_convs text[];
    n_locked bigint;
    v_new_conv text[];
    v_new_a text[];
    v_new_b text[];
    n_new int;
    v_stored json;
    v_missing boolean := false;
    v_miss_user text[] := '{}';
    v_miss_conv text[] := '{}';
    v_miss_a text[] := '{}';
    v_miss_b text[] := '{}';
BEGIN
    -- 1-2. everyone involved: both people of each send (only the sender of a
    -- duplicate: it creates no row, whatever its recipient), each marking member and
    -- peer. A send stored already stays stored, so that one is left out for good.
    SELECT coalesce(array_agg(DISTINCT x.u), '{}') INTO v_users FROM (
        SELECT unnest(s_sender) AS u
        UNION ALL SELECT k.r FROM unnest(s_sender, s_recipient, s_cmid) AS k(s, r, c)
          WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.sender = k.s AND m.cmid = k.c)
        UNION ALL SELECT unnest(ARRAY[mb.user_id, mb.peer])
          FROM unnest(m_user, m_conv) AS k(u, c)
          JOIN members mb ON mb.user_id = k.u AND mb.conv = k.c
    ) x;
    PERFORM 1 FROM users WHERE user_id = ANY(v_users)
        ORDER BY user_id COLLATE "C" FOR UPDATE;
    GET DIAGNOSTICS n_locked = ROW_COUNT;
    IF n_locked < cardinality(v_users) THEN
        v_missing := true;  -- (even if, created meanwhile, none is missing now)
        SELECT coalesce(array_agg(u ORDER BY u COLLATE "C"), '{}') INTO v_miss_user
          FROM unnest(v_users) AS u
         WHERE NOT EXISTS (SELECT 1 FROM users WHERE user_id = u);
    END IF;
    -- 3. the (sender, cmid) already stored
    SELECT json_agg(json_build_object(
        'mid', m.mid, 'conv', m.conv, 'seq', m.seq, 'sender', m.sender,
        'recipient', m.recipient, 'cmid', m.cmid, 'ts', m.ts, 'type', m.type,
        'body', encode(m.body, 'base64'), 'is_text', m.is_text,
        'sender_cur', m.sender_cur, 'recipient_cur', m.recipient_cur))
      INTO v_stored
      FROM (SELECT DISTINCT s, c FROM unnest(s_sender, s_cmid) AS k(s, c)) k
      JOIN messages m ON m.sender = k.s AND m.cmid = k.c;
    -- 4. the first send of each new (sender, cmid): its conversation
    SELECT count(*)::int, coalesce(array_agg(DISTINCT f.cv), '{}')
      INTO n_new, v_new_conv
      FROM (SELECT DISTINCT ON (s, c) s, c, cv
              FROM unnest(s_sender, s_cmid, s_conv) WITH ORDINALITY AS k(s, c, cv, i)
             ORDER BY s, c, i) f
     WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.sender = f.s AND m.cmid = f.c);
    SELECT coalesce(array_agg(DISTINCT x.c), '{}') INTO v_convs FROM (
        SELECT unnest(v_new_conv) AS c
        UNION ALL SELECT mb.conv FROM unnest(m_user, m_conv) AS k(u, c)
          JOIN members mb ON mb.user_id = k.u AND mb.conv = k.c
    ) x;
    PERFORM 1 FROM convs WHERE conv = ANY(v_convs) ORDER BY conv COLLATE "C" FOR UPDATE;
    GET DIAGNOSTICS n_locked = ROW_COUNT;
    IF n_locked < cardinality(v_convs) THEN
        SELECT array_agg(p.cv ORDER BY p.cv COLLATE "C"),
               array_agg(least(p.s, p.r) ORDER BY p.cv COLLATE "C"),
               array_agg(greatest(p.s, p.r) ORDER BY p.cv COLLATE "C")
          INTO v_miss_conv, v_miss_a, v_miss_b
          FROM (SELECT DISTINCT ON (k.cv) k.cv, k.s, k.r
                  FROM unnest(s_sender, s_recipient, s_conv) AS k(s, r, cv)
                 WHERE k.cv = ANY(v_new_conv)
                   AND NOT EXISTS (SELECT 1 FROM convs c WHERE c.conv = k.cv)) p;
        v_missing := true;
    END IF;
    IF v_missing THEN
        -- Created by chatd_create_rows in a transaction of its own, then read again:
        -- inserting here, between two rounds of row locks, could lock out of order.
        RETURN json_build_object('missing', true, 'users', v_miss_user,
            'convs', coalesce(v_miss_conv, '{}'), 'a', coalesce(v_miss_a, '{}'),
            'b', coalesce(v_miss_b, '{}'));
    END IF;
    RETURN json_build_object(
        'users', (SELECT json_agg(json_build_array(user_id, last_cur))
                    FROM users WHERE user_id = ANY(v_users)),
        'stored', v_stored,
        'convs', (SELECT json_agg(json_build_array(conv, last_seq, last_ts, last_mid))
                    FROM convs WHERE conv = ANY(v_convs)),
        'members', (SELECT json_agg(json_build_array(mb.user_id, mb.conv, mb.peer,
                        mb.delivered, mb.read, mb.last_recv_seq, mb.unread))
                      FROM convs c
                     CROSS JOIN LATERAL (VALUES (c.user_a), (c.user_b)) AS p(u)
                      JOIN members mb ON mb.user_id = p.u AND mb.conv = c.conv  -- its key
                     WHERE c.conv = ANY(v_convs)),
        'mids', (SELECT json_agg(nextval(pg_get_serial_sequence('messages', 'mid')))
                   FROM generate_series(1, n_new)));
END
$fn$
"""

CREATE_ROWS = r"""
CREATE OR REPLACE FUNCTION chatd_create_rows(
    n_user text[], n_conv text[], n_a text[], n_b text[]
) RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO users (user_id, last_cur)
        SELECT u, 0 FROM unnest(n_user) AS u ORDER BY u COLLATE "C" ON CONFLICT DO NOTHING;
    INSERT INTO convs (conv, user_a, user_b)
        SELECT * FROM unnest(n_conv, n_a, n_b) AS k(c, a, b) ORDER BY c COLLATE "C"
        ON CONFLICT DO NOTHING;
    INSERT INTO members (user_id, conv, peer)
        SELECT * FROM unnest(n_a || n_b, n_conv || n_conv, n_b || n_a) AS k(u, c, p)
         ORDER BY u COLLATE "C", c COLLATE "C"
        ON CONFLICT DO NOTHING;
END
$fn$
"""

_DROP = (
    "DROP FUNCTION IF EXISTS chatd_batch_read2(text[], text[], text[], text[], text[], text[])",
    "DROP FUNCTION IF EXISTS chatd_create_rows(text[], text[], text[], text[])",
    "DROP FUNCTION IF EXISTS chatd_batch_write_checked(text[], bigint[], text[], bigint[], "
    "bigint[], text[], bigint[], text[], text[], "
    "text[], bigint[], text[], bytea[], boolean[], bigint[], bigint[], text[], bigint[], "
    "text[], text[], bigint[], bigint[], text[], bigint[], text[], bigint[], text[], bigint[], "
    "bigint[], bigint[], text[], text[], bigint[], bigint[], bigint[], bigint[], text[], text[])",
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for stmt in (READ2, CREATE_ROWS, CHECKED_WRITE):
            op.execute(stmt)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for stmt in _DROP:
            op.execute(stmt)
