"""Helpers of the storage tests: a send with the usual arguments, a user's whole stream, a
contract case run on a store of particular options."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from storage.base import Event, SendOutcome, Store
from storage.sql import SqlStore

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


async def run_case(case: Callable[[Store], Awaitable[None]], url: str, **options: Any) -> None:
    """The contract case `case` on a `SqlStore(url, **options)` opened for it."""
    store = SqlStore(url, **options)
    await store.open()
    try:
        await case(store)
    finally:
        await store.close()
