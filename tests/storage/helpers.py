"""Helpers of the storage tests: a send with the usual arguments, a user's whole stream."""

from __future__ import annotations

import asyncio

from storage.base import Event, SendOutcome, Store

TS = 1_700_000_000_000


def send(
    store: Store, a: str, b: str, cmid: str, body: str | bytes = "hi"
) -> asyncio.Future[SendOutcome]:
    """`store.send` (queued at once, in call order: writes passed to one gather share a
    batch in the order written)."""
    return store.send(a, b, cmid, body, "text", TS)


async def all_events(store: Store, user: str) -> list[Event]:
    return await store.events(user, 0, await store.last_cur(user), 1_000_000)


def assert_contiguous(curs: list[int]) -> None:
    assert curs == list(range(1, len(curs) + 1))
