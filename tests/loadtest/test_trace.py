"""Trace generate / write / parse round-trip, determinism, and format errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.generate import GenParams, generate
from loadtest.trace import TraceError, read_trace, write_trace

PARAMS = GenParams(
    users=30,
    rate=50,
    duration=5,
    seed=3,
    offline_per_min=6,
    storms=[(2.0, 0.5, 0.5)],
    bursts=[(1.0, 1.0, 3.0)],
)


@pytest.mark.parametrize("name", ["t.jsonl", "t.jsonl.gz"])
def test_round_trip(tmp_path: Path, name: str) -> None:
    trace = generate(PARAMS)
    write_trace(trace, tmp_path / name)
    back = read_trace(tmp_path / name)
    assert back.users == trace.users
    assert back.duration == pytest.approx(trace.duration)
    assert len(back.events) == len(trace.events)
    for a, b in zip(trace.events, back.events, strict=True):
        assert (a.user, a.kind, a.peer, a.size) == (b.user, b.kind, b.peer, b.size)
        assert a.t == pytest.approx(b.t, abs=1e-6)
    assert back.meta["params"]["seed"] == 3


def test_generator_is_deterministic_and_complete() -> None:
    a, b = generate(PARAMS), generate(PARAMS)
    assert a.events == b.events
    assert generate(GenParams(**{**PARAMS.to_json(), "seed": 4})).events != a.events
    kinds = {e.kind for e in a.events}
    assert {"connect", "disconnect", "send", "read", "typing"} <= kinds
    assert all(e.t <= f.t for e, f in zip(a.events, a.events[1:], strict=False))
    assert all(1 <= e.size <= 16384 for e in a.events if e.kind == "send")
    # nobody sends to themselves; sends go to friends only
    assert all(e.peer != e.user for e in a.events if e.peer is not None)


def test_pairs() -> None:
    tr = generate(GenParams(users=10, rate=100, duration=2, pairs=True, seed=1))
    idx = {u: i for i, u in enumerate(tr.users)}
    assert all(idx[e.peer] == idx[e.user] ^ 1 for e in tr.events if e.kind == "send")


def test_bad_lines(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"t": 0, "u": "a", "e": "send", "to": "b"}\n')
    with pytest.raises(TraceError, match="line 1: send needs 'size'"):
        read_trace(p)
    p.write_text('{"t": 0, "u": "a", "e": "dance"}\n')
    with pytest.raises(TraceError, match="unknown event kind"):
        read_trace(p)
    p.write_text("not json\n")
    with pytest.raises(TraceError, match="not JSON"):
        read_trace(p)


def test_headerless_trace_is_accepted(tmp_path: Path) -> None:
    p = tmp_path / "h.jsonl"
    p.write_text(
        '{"t": 0.5, "u": "b", "e": "connect"}\n{"t": 0.1, "u": "a", "e": "connect"}\n'
        '{"t": 1, "u": "a", "e": "send", "to": "b", "size": 10}\n'
    )
    tr = read_trace(p)
    assert [e.user for e in tr.events] == ["a", "b", "a"]
    assert tr.users == ["a", "b"]
