"""The checker catches a lost, a duplicated and a reordered message (doctored logs)."""

from __future__ import annotations

from typing import Any

from loadtest.checker import check


def _clean() -> tuple[list[Any], list[Any], list[Any]]:
    # alice (0) sends 3 messages to bob (1) in conv "c"; bob receives each once, in order;
    # alice gets bob's delivered receipts.
    sent = [(0, str(n), 1, "c", n, 100 + n, 1000 * n, 1000 * n + 5, False) for n in (1, 2, 3)]
    recv = [(1, 1, "c", n, 0, str(n), 100 + n, 1000 * n + 7) for n in (1, 2, 3)]
    rcpt = [(0, "c", False, n, 1000 * n + 9) for n in (1, 2, 3)]
    return sent, recv, rcpt


def test_clean_run_passes() -> None:
    sent, recv, rcpt = _clean()
    res = check(sent, recv, rcpt)
    assert res.ok
    assert res.counts()["delivered"] == 3
    assert res.d_lat_ns == [2, 2, 2]


def test_lost_message() -> None:
    sent, recv, rcpt = _clean()
    del recv[1]
    res = check(sent, recv, rcpt[:1])
    assert not res.ok
    assert [(x["cmid"], x["seq"]) for x in res.lost] == [("2", 2)]
    assert not res.duplicated and not res.reordered


def test_duplicated_message_across_a_resume() -> None:
    sent, recv, rcpt = _clean()
    recv.append((1, 2, "c", 3, 0, "3", 103, 9000))  # replayed again on the next connection
    res = check(sent, recv, rcpt)
    assert not res.ok
    assert len(res.duplicated) == 1
    assert res.duplicated[0]["cmid"] == "3" and res.duplicated[0]["conn"] == 2
    assert not res.lost


def test_reordered_message() -> None:
    sent, recv, rcpt = _clean()
    recv[1], recv[2] = recv[2], recv[1]
    res = check(sent, recv, rcpt)
    assert not res.ok
    assert len(res.reordered) == 1
    assert res.reordered[0]["seq"] == 2 and res.reordered[0]["after_seq"] == 3
    assert not res.lost and not res.duplicated


def test_dup_sent_after_retry_is_one_message() -> None:
    sent, recv, rcpt = _clean()
    sent.append((0, "3", 1, "c", 3, 103, 3000, 3900, True))  # a retried cmid answered dup:true
    assert check(sent, recv, rcpt).ok


def test_missing_receipt_and_unacked() -> None:
    sent, recv, rcpt = _clean()
    res = check(sent, recv, rcpt[:2], unacked=[(0, "4", 1, 4000)])
    assert [x["seq"] for x in res.missing_receipt] == [3]
    assert res.unacked == 1
    assert not res.ok


def test_seq_conflict() -> None:
    sent, recv, rcpt = _clean()
    sent.append((1, "1", 0, "c", 2, 200, 0, 1, False))  # bob's message got alice's seq 2
    res = check(sent, recv, rcpt, receipts=False)
    assert len(res.seq_conflicts) == 1
