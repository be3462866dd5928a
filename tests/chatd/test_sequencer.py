"""chatd/sequencer.py: the per-connection stream sequencer, rule by rule, then as a state
machine against a model of one user's stream (storage, lost/late/duplicated publishes,
this connection's own results, position checks, fills).

No event loop, no sockets, no sleeps: the time is a float passed in. Frames are made
readable on purpose (b"msg:5", b"sent:5", b"rcpt:5", b"ok:5", b"plain:3", b"typing:3") so
that the `cur` a written frame stands for can be read back from it.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from chatd.sequencer import (
    LIVE,
    OWN_MARK,
    OWN_SENT,
    PLAIN,
    POSITION,
    Gap,
    Item,
    Sequencer,
    StreamGap,
)

# ------------------------------------------------------------------ frames and items


def msg(cur: int) -> bytes:
    return b"msg:%d" % cur


def sent(cur: int) -> bytes:
    return b"sent:%d" % cur


def rcpt(cur: int) -> bytes:
    return b"rcpt:%d" % cur


def ok(cur: int) -> bytes:
    return b"ok:%d" % cur


def cmid_of(cur: int) -> str:
    return f"m{cur}"


def live(cur: int, frame: bytes | None = None) -> Item:
    """A broker delivery of the stored event at `cur` (a `msg` unless told)."""
    return (LIVE, cur, msg(cur) if frame is None else frame, None, "")


def own_sent(cur: int, cmid: str | None = None) -> Item:
    """This connection's `sent` reply to its own message stored at `cur`."""
    return (OWN_SENT, cur, sent(cur), None, cmid_of(cur) if cmid is None else cmid)


def own_mark(cur: int) -> Item:
    """The receipt event of this connection's own mark, then the mark's `ok`."""
    return (OWN_MARK, cur, rcpt(cur), ok(cur), "")


def plain(n: int) -> Item:
    return (PLAIN, 0, b"plain:%d" % n, None, "")


def typing(n: int) -> Item:
    return (LIVE, 0, b"typing:%d" % n, None, "")


def position(stored: int) -> Item:
    """Storage holds the user's events up to `stored` (a periodic check, a resync)."""
    return (POSITION, stored + 1, b"", None, "")


def stored(*curs: int) -> list[tuple[int, bytes, bool]]:
    """What storage hands `fill()` for plain messages at `curs`."""
    return [(cur, msg(cur), False) for cur in curs]


def parse(frame: bytes) -> tuple[str, int]:
    name, _, number = frame.decode().partition(":")
    return name, int(number)


# ------------------------------------------------------------------ in order, duplicates


def test_in_order_live_events_are_written_at_once() -> None:
    seq = Sequencer()
    for cur in (1, 2, 3):
        assert seq.push(live(cur), 0.0) == [msg(cur)]
        assert seq.last == cur
    assert seq.gap(100.0) is None
    assert seq.deadline() is None


def test_a_duplicate_is_dropped() -> None:
    seq = Sequencer()
    assert seq.push(live(1), 0.0) == [msg(1)]
    assert seq.push(live(1), 0.0) == []
    assert seq.push(live(2), 0.0) == [msg(2)]
    assert seq.push(live(1), 0.0) == []
    assert seq.last == 2


def test_an_event_at_or_below_last_is_dropped() -> None:
    seq = Sequencer(last=5)
    assert seq.push(live(3), 0.0) == []
    assert seq.push(live(5), 0.0) == []
    assert seq.last == 5
    assert seq.push(live(6), 0.0) == [msg(6)]
    assert seq.deadline() is None


# ------------------------------------------------------------------ gaps and fills


def test_with_window_0_a_gap_is_due_at_once_and_a_fill_closes_it() -> None:
    seq = Sequencer()
    assert seq.push(live(3), 5.0) == []
    assert seq.last == 0
    assert seq.deadline() == 5.0
    assert seq.gap(5.0) == Gap(after=0, upto=2)
    assert seq.fill(stored(1, 2)) == [msg(1), msg(2), msg(3)]
    assert seq.last == 3
    assert seq.gap(5.0) is None
    assert seq.deadline() is None


def test_a_gap_names_the_range_below_the_lowest_held_event() -> None:
    seq = Sequencer()
    assert seq.push(live(5), 0.0) == []
    assert seq.push(live(3), 0.0) == []
    assert seq.gap(0.0) == Gap(0, 2)
    assert seq.fill(stored(1, 2)) == [msg(1), msg(2), msg(3)]
    # 5 is still held: 4 is missing.
    assert seq.gap(0.0) == Gap(3, 4)
    assert seq.fill(stored(4)) == [msg(4), msg(5)]
    assert seq.deadline() is None


def test_with_a_window_a_gap_is_not_due_before_the_first_hold_plus_the_window() -> None:
    seq = Sequencer(window=0.5)
    assert seq.push(live(3), 10.0) == []
    assert seq.deadline() == 10.5
    assert seq.gap(10.0) is None
    assert seq.gap(10.49) is None
    # A later hold does not move the deadline: 1 and 2 have been missing since 10.0.
    assert seq.push(live(4), 10.3) == []
    assert seq.deadline() == 10.5
    assert seq.gap(10.5) == Gap(0, 2)
    assert seq.gap(11.0) == Gap(0, 2)
    assert seq.fill(stored(1, 2)) == [msg(1), msg(2), msg(3), msg(4)]
    assert seq.deadline() is None


def test_the_deadline_counts_from_the_oldest_held_event_not_the_lowest() -> None:
    seq = Sequencer(window=1.0)
    assert seq.push(live(5), 0.0) == []
    assert seq.push(live(3), 0.8) == []
    assert seq.deadline() == 1.0
    assert seq.gap(1.0) == Gap(0, 2)


def test_after_a_partial_release_the_deadline_is_that_of_the_oldest_still_held() -> None:
    seq = Sequencer(window=1.0)
    assert seq.push(live(2), 0.0) == []
    assert seq.push(live(5), 0.5) == []
    assert seq.push(live(1), 0.6) == [msg(1), msg(2)]
    # 5 (held since 0.5) waits for 3 and 4.
    assert seq.deadline() == 1.5
    assert seq.gap(1.4) is None
    assert seq.gap(1.5) == Gap(2, 4)


@pytest.mark.parametrize(
    ("held_at", "window"),
    [(0.1, 0.7), (77.74672273890171, 0.3), (613.4415310156065, 0.3), (1e9 + 0.1, 0.05)],
)
def test_the_gap_is_due_at_the_deadline_exactly(held_at: float, window: float) -> None:
    """A caller that sleeps until `deadline()` gets its gap then (float rounding must not
    make `gap(deadline())` None: the caller would wake up again and again for nothing)."""
    seq = Sequencer(window=window)
    seq.push(live(2), held_at)
    deadline = seq.deadline()
    assert deadline is not None
    assert seq.gap(deadline) == Gap(0, 1)


def test_a_late_live_event_within_the_window_closes_the_gap_without_a_fill() -> None:
    seq = Sequencer(window=1.0)
    assert seq.push(live(1), 0.0) == [msg(1)]
    assert seq.push(live(3), 0.0) == []
    assert seq.push(live(4), 0.1) == []
    assert seq.push(live(2), 0.5) == [msg(2), msg(3), msg(4)]
    assert seq.last == 4
    assert seq.deadline() is None
    assert seq.gap(5.0) is None


def test_a_fill_that_comes_after_live_events_closed_the_gap_writes_nothing() -> None:
    """The caller reads storage between `gap()` and `fill()`: live events may close the
    gap meanwhile; the fill then only skips what was written."""
    seq = Sequencer()
    assert seq.push(live(3), 0.0) == []
    assert seq.gap(0.0) == Gap(0, 2)
    assert seq.push(live(1), 0.0) == [msg(1)]
    assert seq.push(live(2), 0.0) == [msg(2), msg(3)]
    assert seq.fill(stored(1, 2)) == []
    assert seq.last == 3


def test_a_fill_skips_what_is_at_or_below_last() -> None:
    seq = Sequencer(last=2)
    assert seq.fill(stored(1, 2, 3)) == [msg(3)]
    assert seq.last == 3


def test_a_fill_that_skips_a_cur_raises_stream_gap() -> None:
    seq = Sequencer()
    seq.push(live(4), 0.0)
    assert seq.gap(0.0) == Gap(0, 3)
    with pytest.raises(StreamGap):
        seq.fill(stored(1, 3))


def test_held_duplicates_are_written_once() -> None:
    seq = Sequencer()
    assert seq.push(live(2), 0.0) == []
    assert seq.push(live(2), 0.0) == []
    assert seq.push(live(1), 0.0) == [msg(1), msg(2)]


# ------------------------------------------------------------------ own results


def test_own_sent_before_its_live_echo_writes_only_the_sent() -> None:
    """The normal path: the session pushes the `sent` reply, then the broker's echo."""
    seq = Sequencer(last=4)
    assert seq.push(own_sent(5), 0.0) == [sent(5)]
    assert seq.last == 5
    assert seq.push(live(5), 0.0) == []
    assert seq.take_settled() == [cmid_of(5)]


def test_live_echo_before_own_sent_writes_the_msg_then_the_owed_sent() -> None:
    """The echo wins the race: it is written as any event at `last + 1`; the `sent` reply
    is still owed, so it follows (the client sees its own message once as a `msg`, then
    its `sent`)."""
    seq = Sequencer(last=4)
    assert seq.push(live(5), 0.0) == [msg(5)]
    assert seq.push(own_sent(5), 0.0) == [sent(5)]
    assert seq.last == 5
    assert seq.take_settled() == [cmid_of(5)]


@pytest.mark.parametrize("own_first", [True, False])
def test_held_with_the_same_cur_the_own_sent_goes_before_the_live_echo(own_first: bool) -> None:
    seq = Sequencer()
    items = [own_sent(2), live(2)] if own_first else [live(2), own_sent(2)]
    for item in items:
        assert seq.push(item, 0.0) == []
    assert seq.push(live(1), 0.0) == [msg(1), sent(2)]
    assert seq.take_settled() == [cmid_of(2)]


@pytest.mark.parametrize("own_first", [True, False])
def test_held_with_the_same_cur_the_own_mark_goes_before_the_live_receipt(
    own_first: bool,
) -> None:
    seq = Sequencer()
    items = [own_mark(2), live(2, rcpt(2))] if own_first else [live(2, rcpt(2)), own_mark(2)]
    for item in items:
        assert seq.push(item, 0.0) == []
    assert seq.push(live(1), 0.0) == [msg(1), rcpt(2), ok(2)]


def test_a_fill_writes_an_own_sent_early_and_the_own_sent_item_then_writes_nothing() -> None:
    seq = Sequencer()
    assert seq.push(live(2), 0.0) == []
    assert seq.gap(0.0) == Gap(0, 1)
    # Storage holds this connection's own message at 1 and its `sent` reply is known.
    assert seq.fill([(1, sent(1), True)]) == [sent(1), msg(2)]
    assert seq.push(live(1), 0.0) == []  # the echo
    assert seq.push(own_sent(1), 0.0) == []  # written by the fill already
    assert seq.take_settled() == [cmid_of(1)]
    assert seq.last == 2


def test_an_own_sent_item_held_while_a_fill_writes_its_sent_writes_nothing() -> None:
    """The fill was read (with the `sent` frame) before the own item arrived and held."""
    seq = Sequencer()
    assert seq.push(live(3), 0.0) == []
    assert seq.gap(0.0) == Gap(0, 2)
    events = [(1, msg(1), False), (2, sent(2), True)]
    assert seq.push(own_sent(2), 0.0) == []  # held: 1 is missing
    assert seq.fill(events) == [msg(1), sent(2), msg(3)]
    assert seq.take_settled() == [cmid_of(2)]


def test_an_own_sent_at_or_below_last_not_written_by_a_fill_still_writes_its_reply() -> None:
    # Catch-up got there first (e.g. a resent cmid whose message was stored before).
    seq = Sequencer(last=7)
    assert seq.push(own_sent(5), 0.0) == [sent(5)]
    assert seq.take_settled() == [cmid_of(5)]
    # A fill that did not know the `sent` reply wrote the `msg`: the reply is still owed.
    seq = Sequencer()
    seq.push(live(2), 0.0)
    assert seq.fill([(1, msg(1), False)]) == [msg(1), msg(2)]
    assert seq.push(own_sent(1), 0.0) == [sent(1)]
    assert seq.last == 2


def test_own_mark_writes_its_receipt_then_its_ok() -> None:
    seq = Sequencer(last=2)
    assert seq.push(own_mark(3), 0.0) == [rcpt(3), ok(3)]
    assert seq.last == 3
    assert seq.push(live(3, rcpt(3)), 0.0) == []


def test_own_mark_at_or_below_last_writes_only_its_ok() -> None:
    seq = Sequencer(last=2)
    assert seq.push(live(3, rcpt(3)), 0.0) == [rcpt(3)]
    assert seq.push(own_mark(3), 0.0) == [ok(3)]
    assert seq.push(own_mark(1), 0.0) == [ok(1)]
    assert seq.push((OWN_MARK, 2, rcpt(2), None, ""), 0.0) == []
    assert seq.last == 3


def test_a_held_own_mark_keeps_its_ok_until_its_receipt_is_written() -> None:
    seq = Sequencer()
    assert seq.push(own_mark(2), 0.0) == []
    assert seq.gap(0.0) == Gap(0, 1)
    assert seq.fill(stored(1)) == [msg(1), rcpt(2), ok(2)]


# ------------------------------------------------------------------ positions


def test_a_position_already_reached_writes_and_holds_nothing() -> None:
    seq = Sequencer(last=3)
    for stored in (1, 3):
        assert seq.ready(position(stored))
        assert seq.push(position(stored), 0.0) == []
        assert seq.last == 3
        assert seq.deadline() is None


def test_a_position_ahead_finds_a_lost_last_event() -> None:
    """No later event reveals a lost last publish: the position does, after the window."""
    seq = Sequencer(window=0.05)
    assert seq.push(live(1), 0.0) == [msg(1)]
    # The publish of 2 is lost; storage holds 1..2.
    assert not seq.ready(position(2))
    assert seq.push(position(2), 1.0) == []
    assert seq.deadline() == 1.05
    assert seq.gap(1.01) is None
    assert seq.gap(1.05) == Gap(1, 2)
    assert seq.fill(stored(2)) == [msg(2)]
    assert seq.last == 2
    assert seq.deadline() is None


def test_a_position_ahead_is_released_by_a_late_live_event_within_the_window() -> None:
    seq = Sequencer(window=0.05)
    assert seq.push(position(2), 1.0) == []
    assert seq.push(live(1), 1.01) == [msg(1)]
    assert seq.deadline() is not None  # 2 still missing
    assert seq.push(live(2), 1.02) == [msg(2)]
    assert seq.deadline() is None
    assert seq.last == 2


def test_a_held_position_and_the_event_at_its_cur_write_the_event_once() -> None:
    seq = Sequencer()
    assert seq.push(position(2), 0.0) == []  # storage holds 1..2, then 3 is committed
    assert seq.push(live(3), 0.0) == []
    assert seq.gap(0.0) == Gap(0, 2)
    assert seq.fill(stored(1, 2)) == [msg(1), msg(2), msg(3)]
    assert seq.deadline() is None


# ------------------------------------------------------------------ plain, cur 0, ready


def test_plain_and_cur_0_items_pass_through_even_while_events_are_held() -> None:
    seq = Sequencer(last=1)
    assert seq.push(plain(1), 0.0) == [b"plain:1"]
    assert seq.push(typing(1), 0.0) == [b"typing:1"]
    assert seq.push(live(3), 0.0) == []
    assert seq.push(plain(2), 0.0) == [b"plain:2"]
    assert seq.push(typing(2), 0.0) == [b"typing:2"]
    assert seq.last == 1
    assert seq.gap(0.0) == Gap(1, 2)
    assert seq.push(live(2), 0.0) == [msg(2), msg(3)]


def test_ready_says_when_push_writes_at_once_with_nothing_held() -> None:
    seq = Sequencer(last=2)
    assert seq.ready(live(3))
    assert seq.ready(live(2))  # a duplicate: push writes nothing, holds nothing
    assert seq.ready(own_sent(1))
    assert seq.ready(plain(1))
    assert seq.ready(typing(1))
    assert not seq.ready(live(4))
    assert not seq.ready(own_sent(4))
    assert seq.push(live(5), 0.0) == []
    # Something is held: every push may have to release (or get round) it.
    for item in (live(3), live(1), own_sent(3), plain(1), typing(1)):
        assert not seq.ready(item)
    assert seq.push(live(3), 0.0) == [msg(3)]
    assert not seq.ready(live(4))
    assert seq.push(live(4), 0.0) == [msg(4), msg(5)]
    assert seq.ready(live(6))
    assert seq.push(live(6), 0.0) == [msg(6)]
    assert seq.deadline() is None


def test_settled_reports_own_sent_cmids_once_emitted() -> None:
    seq = Sequencer()
    assert seq.settled is None
    assert seq.take_settled() == []
    assert seq.push(own_sent(2), 0.0) == []
    assert seq.settled is None  # held: not written yet
    assert seq.push(own_mark(3), 0.0) == []
    assert seq.push(live(1), 0.0) == [msg(1), sent(2), rcpt(3), ok(3)]
    assert seq.settled == [cmid_of(2)]  # marks are not reported
    assert seq.push(own_sent(4, cmid=""), 0.0) == [sent(4)]  # no cmid: nothing to report
    assert seq.push(own_sent(1), 0.0) == [sent(1)]  # at or below last: still settled
    assert seq.take_settled() == [cmid_of(2), cmid_of(1)]
    assert seq.settled is None
    assert seq.take_settled() == []


# ------------------------------------------------------------------ the state machine

SEND, MARK, OTHER = "send", "mark", "other"
"""What storage holds at a `cur`: this connection's own message, a receipt of its own
mark, or anything else (another device's or the peer's event)."""


class StreamMachine(RuleBasedStateMachine):
    """One connection of one user. Storage commits events cur 1, 2, ...; each commit
    schedules one or two live deliveries (a duplicated publish), which are delivered in
    any order or dropped (a lost publish). This connection's own messages also owe a
    `sent` reply (pushed once the caller knows it) and its own marks a receipt plus `ok`.
    The caller fills gaps from storage, possibly with pushes between the read and the
    fill (the read is I/O)."""

    window = 0.0
    """The reorder window (a subclass per value)."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = Sequencer(window=self.window)
        self.now = 0.0
        self.storage: list[str] = []
        """storage[cur - 1]: SEND, MARK or OTHER."""
        self.resolved: set[int] = set()
        """Own messages whose `sent` reply the caller knows."""
        self.kept: set[int] = set()
        """Own messages whose `sent` the caller keeps for fills (known, not settled)."""
        self.scheduled_live: list[int] = []
        self.scheduled_own: list[int] = []
        self.inflight: list[tuple[int, bytes, bool]] | None = None
        """Storage read for a gap, not handed to `fill()` yet."""
        self.pushed: dict[int, float] = {}
        """Every stream `cur` pushed (live or own), with when it was first pushed: those
        above `last` are the held ones."""
        self.positions: dict[int, float] = {}
        """The `cur` of every position pushed, with when it was first pushed: those above
        `last + 1` are held."""
        self.live_pushed: set[int] = set()
        self.own_pushed: set[int] = set()
        self.read_as_msg: set[int] = set()
        """Own messages a fill read as their `msg` (the `sent` was not known)."""
        self.read_as_sent: set[int] = set()
        self.out: list[bytes] = []
        self.written: set[int] = set()
        """The `cur`s written in place."""
        self.passed: list[bytes] = []
        """PLAIN and cur-0 frames pushed, in order."""
        self.settled: list[str] = []

    # -------------------------------------------------------------- caller

    def _item(self, cur: int, own: bool) -> Item:
        kind = self.storage[cur - 1]
        if not own:
            return live(cur, rcpt(cur) if kind == MARK else msg(cur))
        return own_sent(cur) if kind == SEND else own_mark(cur)

    def _push(self, item: Item) -> None:
        kind, cur = item[0], item[1]
        stream = kind != PLAIN and cur != 0
        was_holding = self.seq.deadline() is not None
        last = self.seq.last
        ready = self.seq.ready(item)
        frames = self.seq.push(item, self.now)
        if ready:
            assert not was_holding
            assert self.seq.deadline() is None
        else:
            assert was_holding or (stream and cur > last + 1)
        if kind == POSITION:
            assert frames == []
            self.positions.setdefault(cur, self.now)
        elif stream:
            self.pushed.setdefault(cur, self.now)
            (self.live_pushed if kind == LIVE else self.own_pushed).add(cur)
        else:
            assert frames == [item[2]]
            self.passed.append(item[2])
        self._write(frames)

    def _write(self, frames: list[bytes], filled: frozenset[int] = frozenset()) -> None:
        """`filled`: the own messages the fill that wrote `frames` carried as a `msg`."""
        for frame in frames:
            name, cur = parse(frame)
            if name not in ("msg", "sent", "rcpt") or cur in self.written:
                continue
            self.written.add(cur)
            if name == "msg" and self.storage[cur - 1] == SEND:
                # The echo of an own message goes in its place only when its `sent` was
                # not pushed before it (or a fill that did not know the `sent` got there).
                assert cur not in self.own_pushed or cur in filled
        self.out.extend(frames)
        for cmid in self.seq.take_settled():
            cur = int(cmid[1:])
            assert cmid not in self.settled
            assert cur in self.own_pushed
            assert sent(cur) in self.out
            self.settled.append(cmid)
            self.kept.discard(cur)

    def _resolve(self, cur: int) -> None:
        self.resolved.add(cur)
        self.kept.add(cur)
        self.scheduled_own.append(cur)

    def _read(self, gap: Gap) -> list[tuple[int, bytes, bool]]:
        events = []
        for cur in range(gap.after + 1, gap.upto + 1):
            kind = self.storage[cur - 1]
            if kind == SEND and cur in self.kept:
                events.append((cur, sent(cur), True))
                self.read_as_sent.add(cur)
            else:
                events.append((cur, rcpt(cur) if kind == MARK else msg(cur), False))
                if kind == SEND:
                    self.read_as_msg.add(cur)
        return events

    def _fill(self) -> None:
        assert self.inflight is not None
        events, self.inflight = self.inflight, None
        filled = frozenset(cur for cur, frame, _ in events if frame == msg(cur))
        self._write(self.seq.fill(events), filled)

    # -------------------------------------------------------------- rules

    @rule(
        kind=st.sampled_from([OTHER, SEND, MARK]),
        copies=st.integers(1, 2),
        known=st.booleans(),
    )
    def commit(self, kind: str, copies: int, known: bool) -> None:
        self.storage.append(kind)
        cur = len(self.storage)
        self.scheduled_live.extend([cur] * copies)
        if kind == SEND and known:
            self._resolve(cur)
        elif kind == MARK:
            self.scheduled_own.append(cur)

    def _unknown(self) -> list[int]:
        """Own messages whose `sent` reply the caller does not know yet."""
        return [
            cur
            for cur, kind in enumerate(self.storage, 1)
            if kind == SEND and cur not in self.resolved
        ]

    @precondition(lambda self: self._unknown())
    @rule(data=st.data())
    def learn_sent(self, data: st.DataObject) -> None:
        """The caller learns the `sent` reply of an own message after its commit."""
        self._resolve(data.draw(st.sampled_from(self._unknown())))

    @precondition(lambda self: self.scheduled_live)
    @rule(data=st.data(), lost=st.sampled_from([False, False, False, True]))
    def deliver_live(self, data: st.DataObject, lost: bool) -> None:
        """Any scheduled publish, in any order; one in four is lost."""
        cur = self.scheduled_live.pop(data.draw(st.integers(0, len(self.scheduled_live) - 1)))
        if not lost:
            self._push(self._item(cur, own=False))

    @precondition(lambda self: self.scheduled_own)
    @rule(data=st.data())
    def deliver_own(self, data: st.DataObject) -> None:
        cur = self.scheduled_own.pop(data.draw(st.integers(0, len(self.scheduled_own) - 1)))
        self._push(self._item(cur, own=True))

    @rule()
    def check_position(self) -> None:
        """Storage is read for the user's position (a periodic check, a resync)."""
        self._push(position(len(self.storage)))

    @rule(ephemeral=st.booleans())
    def pass_through(self, ephemeral: bool) -> None:
        n = len(self.passed) + 1
        self._push(typing(n) if ephemeral else plain(n))

    @rule(dt=st.sampled_from([0.001, 0.05, 0.1, 0.25, 1.0]))
    def tick(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: self.seq.deadline() is not None)
    @rule()
    def sleep_until_deadline(self) -> None:
        deadline = self.seq.deadline()
        assert deadline is not None
        self.now = max(self.now, deadline)
        assert self.seq.gap(self.now) is not None

    @precondition(lambda self: self.inflight is None and self.seq.gap(self.now) is not None)
    @rule(at_once=st.booleans())
    def read_gap(self, at_once: bool) -> None:
        gap = self.seq.gap(self.now)
        assert gap is not None
        self.inflight = self._read(gap)
        if at_once:
            self._fill()

    @precondition(lambda self: self.inflight is not None)
    @rule()
    def fill(self) -> None:
        self._fill()

    # -------------------------------------------------------------- checks

    @invariant()
    def stream_in_order_each_cur_once(self) -> None:
        last = self.seq.last
        assert last <= len(self.storage)
        in_place: list[int] = []
        frames: dict[int, list[str]] = {}
        oks: list[int] = []
        for frame in self.out:
            name, cur = parse(frame)
            if name in ("plain", "typing"):
                continue
            if name == "ok":
                assert "rcpt" in frames.get(cur, []), "an ok before its receipt"
                oks.append(cur)
                continue
            if cur not in frames:
                in_place.append(cur)
            frames.setdefault(cur, []).append(name)
        assert in_place == list(range(1, last + 1))
        assert sorted(oks) == sorted(set(oks)), "an ok written twice"
        for cur, names in frames.items():
            kind = self.storage[cur - 1]
            if kind == OTHER:
                assert names == ["msg"]
            elif kind == MARK:
                assert names == ["rcpt"]
                assert (cur in oks) == (cur in self.own_pushed)
            else:
                # Its `sent` at most once, in place or after its `msg`; never a `msg`
                # after a `sent` written in its place.
                assert names in (["sent"], ["msg"], ["msg", "sent"])
                if cur in self.own_pushed:
                    assert "sent" in names
                if names[0] == "msg":
                    assert cur in self.live_pushed or cur in self.read_as_msg
                else:
                    assert cur in self.own_pushed or cur in self.read_as_sent
        assert all(self.storage[cur - 1] == MARK and cur in frames for cur in oks)

    @invariant()
    def passed_through_in_order(self) -> None:
        assert [f for f in self.out if parse(f)[0] in ("plain", "typing")] == self.passed

    @invariant()
    def held_and_gap(self) -> None:
        last = self.seq.last
        assert last + 1 not in self.pushed
        held = {cur: at for cur, at in self.pushed.items() if cur > last}
        for cur, at in self.positions.items():
            if cur > last + 1:
                held[cur] = min(at, held.get(cur, at))
        deadline = self.seq.deadline()
        gap = self.seq.gap(self.now)
        if not held:
            assert deadline is None
            assert gap is None
            return
        # The missing events have been missing since the oldest held item arrived.
        assert deadline == min(held.values()) + self.window
        if self.now < deadline:
            assert gap is None
        else:
            assert gap == Gap(last, min(held) - 1)

    def teardown(self) -> None:
        """Deliver everything still scheduled, then fill every gap past the window."""
        for cur in self._unknown():
            self._resolve(cur)
        while self.scheduled_own or self.scheduled_live:
            pending = self.scheduled_own or self.scheduled_live
            cur = pending.pop()
            self._push(self._item(cur, own=pending is self.scheduled_own))
        if self.inflight is not None:
            self._fill()
        for _ in range(len(self.storage) + 1):
            deadline = self.seq.deadline()
            if deadline is None:
                break
            self.now = max(self.now, deadline)
            gap = self.seq.gap(self.now)
            assert gap is not None
            self.inflight = self._read(gap)
            self._fill()
        self.stream_in_order_each_cur_once()
        self.passed_through_in_order()
        self.held_and_gap()
        assert self.seq.last == max(max(self.pushed, default=0), max(self.positions, default=1) - 1)
        own = [cur for cur, kind in enumerate(self.storage, 1) if kind == SEND]
        assert sorted(self.settled) == sorted(cmid_of(cur) for cur in own)
        assert sorted(f for f in self.out if f.startswith(b"sent:")) == sorted(map(sent, own))
        marks = [cur for cur, kind in enumerate(self.storage, 1) if kind == MARK]
        assert sorted(f for f in self.out if f.startswith(b"ok:")) == sorted(map(ok, marks))


@pytest.mark.parametrize("window", [0.0, 0.2])
def test_state_machine(window: float) -> None:
    class Machine(StreamMachine):
        pass

    Machine.window = window
    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=150,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            report_multiple_bugs=False,
            # The explain phase traces every line (slow before Python 3.12).
            phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
        ),
    )
