"""One side of the two-process stress test (tests/storage/test_two_processes.py).

    python -m tests.storage.stress_worker URL SIDE ROUNDS WRITERS

Opens a SqlStore on URL, prints `ready`, waits for a line on stdin, then hammers
the ten conversations of five users from both directions (sends, each followed by
the recipient's delivered or read mark up to that message), plus the same shared
(sender, cmid) pairs as the other side, and prints one JSON line: every outcome.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from typing import Any

from storage.base import MarkKind, MarkOutcome, SendOutcome
from storage.sql import SqlStore

USERS = [f"u{i}" for i in range(5)]
PAIRS = list(itertools.combinations(USERS, 2))  # ten conversations
SHARED = 10
"""(sender, cmid) pairs both sides send: one row each, the other side's is a dup."""


def _sent(o: SendOutcome) -> dict[str, Any]:
    m = o.message
    return {
        "sender": m.sender,
        "cmid": m.cmid,
        "mid": m.mid,
        "conv": m.conv,
        "seq": m.seq,
        "sender_cur": o.sender_cur,
        "recipient_cur": o.recipient_cur,
        "dup": o.dup,
    }


async def _send_and_mark(store: SqlStore, side: str, r: int, i: int) -> dict[str, Any]:
    a, b = PAIRS[i]
    if (r + i) % 2:
        a, b = b, a
    out = await store.send(a, b, f"{side}-{r}-{i}", f"{side} {r} {i}", "text", r)
    kind: MarkKind = "read" if r % 3 == 0 else "delivered"
    mark: MarkOutcome = await store.mark(b, out.message.conv, kind, out.message.seq, r)
    return {"send": _sent(out), "marked": mark.receipt is not None}


async def _shared(store: SqlStore, r: int) -> dict[str, Any]:
    a, b = PAIRS[r % len(PAIRS)]
    return {"send": _sent(await store.send(a, b, f"shared-{r}", "shared", "text", r))}


async def main(url: str, side: str, rounds: int, writers: int) -> None:
    store = SqlStore(url, max_batch=64, writers=writers)
    await store.open()
    try:
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        results: list[dict[str, Any]] = []
        for r in range(rounds):
            jobs = [_send_and_mark(store, side, r, i) for i in range(len(PAIRS))]
            if r < SHARED:  # the same (sender, cmid) from both processes
                jobs.append(_shared(store, r))
            results.extend(await asyncio.gather(*jobs))
        print(json.dumps(results), flush=True)
    finally:
        await store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
