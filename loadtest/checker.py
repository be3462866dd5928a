"""The delivery checker: exactly once, in order per conversation, with receipts.

Input: the raw logs of every worker (see `engine.py`):
- sent:   (sender, cmid, to, conv, seq, mid, t_sched, t_sent, dup)
- recv:   (recipient, conn_no, conv, seq, from, cmid, mid, t_recv) in arrival order
- rcpt:   (sender, conv, is_read, upto, t) receipts by the other person
- unacked: (sender, cmid, to, t_sched): sends that never got `sent`

The raw received stream is checked, before any dedupe by `mid`: a device that
resumes with `since` must never see a message twice, so a raw repeat is a
server bug, not noise.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CheckResult", "check"]

_EXAMPLES = 20


@dataclass(slots=True)
class CheckResult:
    sent: int = 0
    """Distinct messages acknowledged with `sent`."""
    delivered: int = 0
    """Of those, received by the recipient at least once."""
    lost: list[dict[str, Any]] = field(default_factory=list)
    duplicated: list[dict[str, Any]] = field(default_factory=list)
    reordered: list[dict[str, Any]] = field(default_factory=list)
    missing_receipt: list[dict[str, Any]] = field(default_factory=list)
    unexpected: list[dict[str, Any]] = field(default_factory=list)
    """Received, but never acknowledged to its sender and never unacked either."""
    unacked: int = 0
    """Sends that never got `sent` (the run ended first)."""
    unacked_delivered: int = 0
    seq_conflicts: list[dict[str, Any]] = field(default_factory=list)
    """Two different messages with the same (conv, seq)."""
    d_lat_ns: list[int] = field(default_factory=list)
    """msg at the recipient -> delivered receipt at the sender, per message."""

    @property
    def ok(self) -> bool:
        return not (
            self.lost
            or self.duplicated
            or self.reordered
            or self.missing_receipt
            or self.unexpected
            or self.seq_conflicts
            or self.unacked
        )

    def counts(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "delivered": self.delivered,
            "lost": len(self.lost),
            "duplicated": len(self.duplicated),
            "reordered": len(self.reordered),
            "missing_receipt": len(self.missing_receipt),
            "unexpected": len(self.unexpected),
            "seq_conflicts": len(self.seq_conflicts),
            "unacked": self.unacked,
            "unacked_delivered": self.unacked_delivered,
        }

    def summary(self, users: Sequence[str] | None = None) -> dict[str, Any]:
        return {
            "ok": self.ok,
            **self.counts(),
            "examples": {
                "lost": self.lost[:_EXAMPLES],
                "duplicated": self.duplicated[:_EXAMPLES],
                "reordered": self.reordered[:_EXAMPLES],
                "missing_receipt": self.missing_receipt[:_EXAMPLES],
                "unexpected": self.unexpected[:_EXAMPLES],
                "seq_conflicts": self.seq_conflicts[:_EXAMPLES],
            },
        }


def check(
    sent: Iterable[Sequence[Any]],
    recv: Iterable[Sequence[Any]],
    rcpt: Iterable[Sequence[Any]] = (),
    unacked: Iterable[Sequence[Any]] = (),
    *,
    receipts: bool = True,
    names: Sequence[str] | None = None,
) -> CheckResult:
    res = CheckResult()

    def nm(i: Any) -> Any:
        return names[i] if names is not None and isinstance(i, int) and 0 <= i < len(names) else i

    # the acknowledged messages, once each (a dup `sent` repeats the original)
    msgs: dict[tuple[Any, str], tuple[Any, ...]] = {}
    by_conv_seq: dict[tuple[Any, Any], tuple[Any, str]] = {}
    for s in sent:
        sender, cmid, to, conv, seq, mid = s[0], str(s[1]), s[2], s[3], s[4], s[5]
        key = (sender, cmid)
        if key in msgs:
            continue
        msgs[key] = (to, conv, seq, mid)
        other = by_conv_seq.setdefault((conv, seq), key)
        if other != key:
            res.seq_conflicts.append(
                {"conv": conv, "seq": seq, "a": [nm(other[0]), other[1]], "b": [nm(sender), cmid]}
            )
    res.sent = len(msgs)
    unacked_keys = {(u[0], str(u[1])) for u in unacked}
    res.unacked = len(unacked_keys)

    # the raw received streams
    times: dict[tuple[Any, str], int] = {}
    seen_count: dict[tuple[Any, str], int] = defaultdict(int)
    last_seq: dict[tuple[Any, Any], tuple[int, Any]] = {}
    for r in recv:
        user, conn_no, conv, seq, frm, cmid, t = r[0], r[1], r[2], r[3], r[4], str(r[5]), r[7]
        key = (frm, cmid)
        seen_count[key] += 1
        n = seen_count[key]
        info = msgs.get(key)
        if n == 1:
            times[key] = t
            if info is None:
                if key in unacked_keys:
                    res.unacked_delivered += 1
                else:
                    res.unexpected.append(
                        {"from": nm(frm), "cmid": cmid, "to": nm(user), "conv": conv, "seq": seq}
                    )
        else:
            res.duplicated.append(
                {
                    "from": nm(frm),
                    "cmid": cmid,
                    "to": nm(user),
                    "conv": conv,
                    "seq": seq,
                    "times": n,
                    "conn": conn_no,
                }
            )
        if info is not None and info[0] != user:
            res.unexpected.append(
                {"from": nm(frm), "cmid": cmid, "to": nm(user), "wrong_recipient": True}
            )
        lk = (user, conv)
        prev = last_seq.get(lk)
        if prev is not None and seq <= prev[0] and n == 1:
            res.reordered.append(
                {
                    "to": nm(user),
                    "conv": conv,
                    "seq": seq,
                    "after_seq": prev[0],
                    "from": nm(frm),
                    "cmid": cmid,
                }
            )
        if prev is None or seq > prev[0]:
            last_seq[lk] = (seq, key)

    # receipts back at the sender: per (sender, conv) the watermark's history
    marks: dict[tuple[Any, Any], tuple[list[int], list[int]]] = {}
    for c in sorted(rcpt, key=lambda x: x[4]):
        sender, conv, upto, t = c[0], c[1], c[3], c[4]
        ups, ts = marks.setdefault((sender, conv), ([], []))
        if not ups or upto > ups[-1]:
            ups.append(upto)
            ts.append(t)

    for key, (to, conv, seq, mid) in msgs.items():
        if key not in times:
            res.lost.append(
                {
                    "from": nm(key[0]),
                    "cmid": key[1],
                    "to": nm(to),
                    "conv": conv,
                    "seq": seq,
                    "mid": mid,
                }
            )
            continue
        res.delivered += 1
        if not receipts:
            continue
        m = marks.get((key[0], conv))
        i = bisect.bisect_left(m[0], seq) if m is not None else 0
        if m is None or i >= len(m[0]):
            res.missing_receipt.append(
                {"from": nm(key[0]), "cmid": key[1], "to": nm(to), "conv": conv, "seq": seq}
            )
            continue
        res.d_lat_ns.append(max(0, m[1][i] - times[key]))
    return res
