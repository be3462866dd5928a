"""The batch plan: what one group commit writes, decided once in Python.

`apply_batch(io, batch)` runs inside the transaction its caller opened (and
commits) and returns a result per op. The number of statements per batch does
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
5. compute seq / cur / watermarks in Python, in queue order (`BatchPlan`, no I/O);
6. executemany inserts of messages (RETURNING mid) and events, executemany
   updates of the counters, watermarks and unread counts (an unread count is
   recounted with one correlated COUNT per member whose read mark moved).

Steps 1-4 are `read_batch`, step 6 `write_batch`; the statements themselves are
a `storage.batch_io.BatchIO`. On SQLite the writer keeps the users / convs /
members rows it read or wrote between batches (`batch_io.SqliteCache`): steps 1,
2 and 4 read only the rows it does not hold yet. It is dropped when another
connection has committed (`PRAGMA data_version`) and after any failed batch.
Step 6 there is one multi-row statement per table and chunk (INSERT ... VALUES,
UPDATE ... FROM VALUES), with the message ids assigned by the writer, which is
the only one.

A validation failure of one op (NotAMember, UptoTooHigh) is decided in step 5
and is that op's result: it fails only that op (see `storage.writer`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from storage.base import (
    MarkOutcome,
    NotAMember,
    ReceiptRecord,
    SendOutcome,
    StoredMessage,
    UptoTooHigh,
    conv_id,
)
from storage.batch_io import BatchIO
from storage.ops import MarkOp, Op, SendOp
from storage.records import DUP_COL_NAMES, dup_from, encode_body
from storage.schema import members

__all__ = ["BatchPlan", "apply_batch", "read_batch", "write_batch"]

_MEMBER_COL_NAMES = tuple(c.name for c in members.c)

UserConv = tuple[str, str]
"""(user, conv): the key of a members row."""


class _Unavailable(Exception):
    """Internal: a batch failed for a reason that is not a driver error."""


def apply_batch(io: BatchIO, batch: Sequence[Op]) -> list[object]:
    """Steps 1-6 for `batch`, in the open transaction of `io`: a result per op, in order
    (its outcome, or the NotAMember / UptoTooHigh that fails it alone)."""
    plan = read_batch(io, batch)
    plan.compute()
    write_batch(io, plan)
    return plan.results


# --------------------------------------------------------------------- rows


@dataclass(slots=True)
class ConvCounters:
    """A `convs` row's counters, as the batch moves them."""

    last_seq: int
    last_ts: int
    last_mid: int
    dirty: bool = False


@dataclass(slots=True)
class MemberMarks:
    """A `members` row, as the batch moves it."""

    peer: str
    delivered: int
    read: int
    last_recv_seq: int
    unread: int
    dirty: bool = False
    recount: bool = False
    """The read mark moved: step 6 counts `unread` again."""


@dataclass(slots=True)
class PendingMsg:
    """A message to insert; its mid is known after the INSERT."""

    op_index: int
    row: dict[str, Any]
    event_rows: list[dict[str, Any]] = field(default_factory=list)


def _cur_map(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    return {r["user_id"]: int(r["last_cur"]) for r in rows}


def _conv_map(rows: Sequence[Mapping[str, Any]]) -> dict[str, ConvCounters]:
    return {
        r["conv"]: ConvCounters(int(r["last_seq"]), int(r["last_ts"]), int(r["last_mid"]))
        for r in rows
    }


# ------------------------------------------------------------ steps 1-4: read


def read_batch(io: BatchIO, batch: Sequence[Op]) -> BatchPlan:
    """Steps 1-4: read and lock (creating the missing ones) the rows `batch` moves."""
    sends = [op for op in batch if isinstance(op, SendOp)]
    marks = [op for op in batch if isinstance(op, MarkOp)]
    mark_peer = _mark_peers(io, sends, marks)
    stored = _stored_sends(io, sends)
    last_cur = _lock_users(io, sends, mark_peer, stored)
    first_of, send_convs = _new_sends(batch, stored)
    convs = _lock_convs(io, send_convs, mark_peer)
    members = _read_members(io, send_convs, mark_peer)
    return BatchPlan(batch, mark_peer, last_cur, stored, first_of, convs, members)


def _mark_peers(io: BatchIO, sends: list[SendOp], marks: list[MarkOp]) -> dict[UserConv, str]:
    """1. the marking users' member rows: who is the peer (membership never changes)."""
    mark_peer: dict[UserConv, str] = {}
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
    return mark_peer


def _lock_users(
    io: BatchIO,
    sends: list[SendOp],
    mark_peer: dict[UserConv, str],
    stored: dict[tuple[str, str], SendOutcome],
) -> dict[str, int]:
    """2. users: lock (sorted), create the missing ones, lock those; their `last_cur`.
    The recipient of a duplicate (its (sender, cmid) stored already) is left out: a
    duplicate creates no row, whatever its `to`."""
    user_ids: set[str] = set()
    for s in sends:
        user_ids.add(s.sender)
        if (s.sender, s.cmid) not in stored:
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
    return last_cur


def _stored_sends(io: BatchIO, sends: list[SendOp]) -> dict[tuple[str, str], SendOutcome]:
    """3. the (sender, cmid) already stored, as dup outcomes."""
    stored: dict[tuple[str, str], SendOutcome] = {}
    if sends:
        pairs = sorted({(s.sender, s.cmid) for s in sends})
        for mp in io.pairs("messages", ("sender", "cmid"), DUP_COL_NAMES, pairs):
            stored[(mp["sender"], mp["cmid"])] = dup_from(mp)
    return stored


def _new_sends(
    batch: Sequence[Op], stored: dict[tuple[str, str], SendOutcome]
) -> tuple[dict[tuple[str, str], int], dict[str, tuple[str, str]]]:
    """The first send of each (sender, cmid) not stored yet: its index in the batch;
    and the conversations of those sends: conv -> (sender, recipient)."""
    first_of: dict[tuple[str, str], int] = {}
    send_convs: dict[str, tuple[str, str]] = {}
    for i, s_op in enumerate(batch):
        if isinstance(s_op, SendOp):
            key = (s_op.sender, s_op.cmid)
            if key in stored or key in first_of:
                continue
            first_of[key] = i
            send_convs[conv_id(s_op.sender, s_op.recipient)] = (s_op.sender, s_op.recipient)
    return first_of, send_convs


def _lock_convs(
    io: BatchIO, send_convs: dict[str, tuple[str, str]], mark_peer: dict[UserConv, str]
) -> dict[str, ConvCounters]:
    """4. convs: lock (sorted), create the missing ones with their two members rows,
    lock those."""
    conv_keys = sorted(set(send_convs) | {c for (_u, c) in mark_peer})
    if not conv_keys:
        return {}
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
    return conv_state


def _read_members(
    io: BatchIO, send_convs: dict[str, tuple[str, str]], mark_peer: dict[UserConv, str]
) -> dict[UserConv, MemberMarks]:
    """4. the members rows of both people of each send and of each marking user."""
    member_keys: set[UserConv] = set()
    for c, (a, b) in send_convs.items():
        member_keys.add((a, c))
        member_keys.add((b, c))
    member_keys.update(mark_peer)
    if not member_keys:  # (no conversation either)
        return {}
    rows = io.pairs("members", ("user_id", "conv"), _MEMBER_COL_NAMES, sorted(member_keys))
    return {
        (r["user_id"], r["conv"]): MemberMarks(
            peer=r["peer"],
            delivered=int(r["delivered"]),
            read=int(r["read"]),
            last_recv_seq=int(r["last_recv_seq"]),
            unread=int(r["unread"]),
        )
        for r in rows
    }


# ------------------------------------------------------- step 5: compute


@dataclass(slots=True)
class BatchPlan:
    """Step 5: what the batch writes, computed in queue order from the rows of steps
    1-4 (no I/O). `compute` moves the counters in `last_cur`, `convs` and `members`
    (marking what moved) and fills `results`, `pending` and `receipt_rows`."""

    batch: Sequence[Op]
    mark_peer: dict[UserConv, str]
    """(user, conv) of each mark whose user is in conv -> the other person."""
    last_cur: dict[str, int]
    """The newest `cur` of everyone the batch involves."""
    stored: dict[tuple[str, str], SendOutcome]
    """(sender, cmid) stored before this batch -> its dup outcome."""
    first_of: dict[tuple[str, str], int]
    """(sender, cmid) not stored yet -> the index of its first send in the batch."""
    convs: dict[str, ConvCounters]
    members: dict[UserConv, MemberMarks]
    results: list[object] = field(init=False)
    """A result per op: its outcome or the exception that fails it (sends: after step 6)."""
    cur_dirty: set[str] = field(default_factory=set)
    """The users whose `last_cur` moved."""
    pending: list[PendingMsg] = field(default_factory=list)
    receipt_rows: list[dict[str, Any]] = field(default_factory=list)
    dup_of: dict[int, int] = field(default_factory=dict)
    """The index of a repeated send in the batch -> the index of its first send."""

    def __post_init__(self) -> None:
        self.results = [None] * len(self.batch)

    def compute(self) -> None:
        plan_send, plan_mark = self._plan_send, self._plan_mark
        for i, op in enumerate(self.batch):
            if isinstance(op, SendOp):
                plan_send(i, op)
            else:
                plan_mark(i, op)

    def _next_cur(self, user: str) -> int:
        n = self.last_cur[user] + 1
        self.last_cur[user] = n
        self.cur_dirty.add(user)
        return n

    def _plan_send(self, i: int, sop: SendOp) -> None:
        """The message of a send (its mid comes in step 6), or its dup."""
        key = (sop.sender, sop.cmid)
        if key in self.stored:
            self.results[i] = self.stored[key]
            return
        if self.first_of[key] != i:
            self.dup_of[i] = self.first_of[key]
            return
        c = conv_id(sop.sender, sop.recipient)
        cs = self.convs[c]
        cs.last_seq += 1
        cs.last_ts = sop.ts
        cs.dirty = True
        seq = cs.last_seq
        rm = self.members[(sop.recipient, c)]
        rm.last_recv_seq = seq
        rm.unread += 1
        rm.dirty = True
        s_cur = self._next_cur(sop.sender)
        r_cur = self._next_cur(sop.recipient)
        body, is_text = encode_body(sop.body)
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
            {"user_id": sop.recipient, "cur": r_cur, "kind": "msg", "conv": c, "ts": sop.ts},
        ]
        self.pending.append(PendingMsg(i, row, evs))

    def _plan_mark(self, i: int, mop: MarkOp) -> None:
        """A mark's move of the watermark and its two receipt events, or why not."""
        mkey = (mop.user, mop.conv)
        peer = self.mark_peer.get(mkey)
        member = self.members.get(mkey)
        mcs = self.convs.get(mop.conv)
        # A conversation with no message yet (created later in this batch) does not exist.
        if peer is None or member is None or mcs is None or mcs.last_seq == 0:
            self.results[i] = NotAMember(f"{mop.user} is not in conversation {mop.conv}")
            return
        if mop.upto > mcs.last_seq:
            self.results[i] = UptoTooHigh(f"upto {mop.upto} > last seq {mcs.last_seq}")
            return
        capped = min(mop.upto, member.last_recv_seq)
        if mop.kind == "delivered":
            if capped <= member.delivered:
                self.results[i] = MarkOutcome(None, peer=peer, watermark=member.delivered)
                return
            member.delivered = capped
        else:
            if capped <= member.read:
                self.results[i] = MarkOutcome(None, peer=peer, watermark=member.read)
                return
            member.read = capped
            member.delivered = max(member.delivered, capped)
            member.recount = True
        member.dirty = True
        m_cur = self._next_cur(mop.user)
        p_cur = self._next_cur(peer)
        for u, cur in ((mop.user, m_cur), (peer, p_cur)):
            self.receipt_rows.append(
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
        self.results[i] = MarkOutcome(
            receipt=ReceiptRecord(mop.conv, mop.kind, capped, mop.user, mop.ts),
            marker_cur=m_cur,
            peer=peer,
            peer_cur=p_cur,
            watermark=capped,
        )


# ---------------------------------------------------------- step 6: write


def write_batch(io: BatchIO, plan: BatchPlan) -> None:
    """6. insert the messages and events, answer the sends, update the counters."""
    if plan.pending:
        _insert_messages(io, plan)
    if plan.receipt_rows:
        io.insert_events(plan.receipt_rows)
    results = plan.results
    for i, j in plan.dup_of.items():
        orig = cast(SendOutcome, results[j])
        results[i] = SendOutcome(orig.message, orig.sender_cur, orig.recipient_cur, dup=True)
    _update_counters(io, plan)


def _insert_messages(io: BatchIO, plan: BatchPlan) -> None:
    """The pending messages, then their events; each send's outcome now that its mid is known."""
    pending, batch, results, conv_state = plan.pending, plan.batch, plan.results, plan.convs
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
                body=cast(SendOp, batch[pm.op_index]).body,
            ),
            sender_cur=prow["sender_cur"],
            recipient_cur=prow["recipient_cur"],
            dup=False,
        )
    io.insert_events(msg_events)


def _update_counters(io: BatchIO, plan: BatchPlan) -> None:
    """The users' `last_cur`, the convs' counters and the members' marks that moved (in
    key order), then the unread counts to recount."""
    last_cur, conv_state, member_state = plan.last_cur, plan.convs, plan.members
    if plan.cur_dirty:
        io.update_user_curs([{"b_user": u, "b_cur": last_cur[u]} for u in sorted(plan.cur_dirty)])
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
