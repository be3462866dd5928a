"""PostgreSQL: the group commit's two server-side functions (nothing on SQLite)

`chatd_batch_read` runs steps 1-4 of a batch (storage/plan.py) in one round trip:
it locks the users rows (sorted), creates the missing ones, reads the (sender,
cmid) already stored, locks the convs rows (sorted), creates the missing convs
and members rows, and answers every row the plan needs (JSON) with the message
ids for the new messages. `chatd_batch_write` runs step 6 in one round trip
from parallel arrays (unnest), with synchronous_commit on for its transaction.
Python (storage/plan.py) still computes step 5.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Locks are taken in "C" collation order on every node, whatever the database's
# collation: two transactions always lock rows in one order (no deadlock cycle).
READ_FUNCTION = r"""
CREATE OR REPLACE FUNCTION chatd_batch_read(
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
        INSERT INTO users (user_id, last_cur)
            SELECT u, 0 FROM unnest(v_users) AS u ORDER BY u COLLATE "C"
            ON CONFLICT DO NOTHING;
        PERFORM 1 FROM users WHERE user_id = ANY(v_users)
            ORDER BY user_id COLLATE "C" FOR UPDATE;
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
          INTO v_new_conv, v_new_a, v_new_b
          FROM (SELECT DISTINCT ON (k.cv) k.cv, k.s, k.r
                  FROM unnest(s_sender, s_recipient, s_conv) AS k(s, r, cv)
                 WHERE k.cv = ANY(v_new_conv)
                   AND NOT EXISTS (SELECT 1 FROM convs c WHERE c.conv = k.cv)) p;
        INSERT INTO convs (conv, user_a, user_b)
            SELECT * FROM unnest(v_new_conv, v_new_a, v_new_b) ON CONFLICT DO NOTHING;
        INSERT INTO members (user_id, conv, peer)
            SELECT * FROM unnest(v_new_a || v_new_b, v_new_conv || v_new_conv,
                                 v_new_b || v_new_a)
            ON CONFLICT DO NOTHING;
        PERFORM 1 FROM convs WHERE conv = ANY(v_convs) ORDER BY conv COLLATE "C" FOR UPDATE;
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

WRITE_FUNCTION = r"""
CREATE OR REPLACE FUNCTION chatd_batch_write(
    m_mid bigint[], m_conv text[], m_seq bigint[], m_sender text[], m_recipient text[],
    m_cmid text[], m_ts bigint[], m_type text[], m_body bytea[], m_is_text boolean[],
    m_sender_cur bigint[], m_recipient_cur bigint[],
    e_user text[], e_cur bigint[], e_kind text[], e_conv text[], e_mid bigint[],
    e_upto bigint[], e_by text[], e_ts bigint[],
    u_user text[], u_cur bigint[],
    c_conv text[], c_seq bigint[], c_ts bigint[], c_mid bigint[],
    b_user text[], b_conv text[], b_delivered bigint[], b_read bigint[], b_recv bigint[],
    b_unread bigint[],
    r_user text[], r_conv text[]
) RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    -- `sent` means durable: this transaction's COMMIT waits for the WAL flush whatever
    -- the server's, database's or role's default (no extra round trip; PgBouncer-safe).
    PERFORM set_config('synchronous_commit', 'on', true);
    INSERT INTO messages (mid, conv, seq, sender, recipient, cmid, ts, type, body, is_text,
                          sender_cur, recipient_cur)
        SELECT * FROM unnest(m_mid, m_conv, m_seq, m_sender, m_recipient, m_cmid, m_ts,
                             m_type, m_body, m_is_text, m_sender_cur, m_recipient_cur);
    INSERT INTO events (user_id, cur, kind, conv, mid, upto, by_user, ts)
        SELECT * FROM unnest(e_user, e_cur, e_kind, e_conv, e_mid, e_upto, e_by, e_ts);
    UPDATE users SET last_cur = v.cur
      FROM unnest(u_user, u_cur) AS v(u, cur) WHERE users.user_id = v.u;
    UPDATE convs SET last_seq = v.seq, last_ts = v.ts, last_mid = v.mid
      FROM unnest(c_conv, c_seq, c_ts, c_mid) AS v(c, seq, ts, mid) WHERE convs.conv = v.c;
    UPDATE members SET delivered = v.d, read = v.r, last_recv_seq = v.recv, unread = v.n
      FROM unnest(b_user, b_conv, b_delivered, b_read, b_recv, b_unread)
           AS v(u, c, d, r, recv, n)
     WHERE members.user_id = v.u AND members.conv = v.c;
    UPDATE members SET unread = (
            SELECT count(*) FROM messages m
             WHERE m.conv = members.conv AND m.recipient = members.user_id
               AND m.seq > members.read)
      FROM unnest(r_user, r_conv) AS v(u, c)
     WHERE members.user_id = v.u AND members.conv = v.c;
END
$fn$
"""

_DROP = (
    "DROP FUNCTION IF EXISTS chatd_batch_read(text[], text[], text[], text[], text[], text[])",
    "DROP FUNCTION IF EXISTS chatd_batch_write(bigint[], text[], bigint[], text[], text[], "
    "text[], bigint[], text[], bytea[], boolean[], bigint[], bigint[], text[], bigint[], "
    "text[], text[], bigint[], bigint[], text[], bigint[], text[], bigint[], text[], bigint[], "
    "bigint[], bigint[], text[], text[], bigint[], bigint[], bigint[], bigint[], text[], text[])",
)


def _postgres() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    if _postgres():
        op.execute(READ_FUNCTION)
        op.execute(WRITE_FUNCTION)


def downgrade() -> None:
    if _postgres():
        for stmt in _DROP:
            op.execute(stmt)
