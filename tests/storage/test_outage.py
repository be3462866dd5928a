"""A PostgreSQL outage under load: the store's connections are reset and new ones refused
(through a proxy this test owns: the shared server is never stopped), then the database
comes back. Writes in the outage fail with StorageUnavailable (never a `sent` for what
was not committed); clients retry with the same cmid; afterwards every message is
stored once and the invariants hold."""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict

import pytest
from sqlalchemy.engine import make_url

from storage.base import SendOutcome, StorageUnavailable
from storage.sql import SqlStore
from tests.storage.helpers import TS, all_events, assert_contiguous
from tests.storage.tcp_proxy import CuttableProxy

USERS = ["ann", "ben", "cid", "dee"]
CLIENTS = 6


class Load:
    """CLIENTS clients, each sending its own messages one after the other; a send that
    fails is sent again with the same cmid once the database is back."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store
        self.acked: dict[tuple[str, str], SendOutcome] = {}
        self.failures = 0
        self.failed = asyncio.Event()
        self.back = asyncio.Event()
        self.back.set()
        self.stop = asyncio.Event()
        self.progress = asyncio.Event()

    async def client(self, k: int) -> None:
        pairs = list(itertools.permutations(USERS, 2))
        for n in range(10_000):  # bounded; ends on `stop`
            if self.stop.is_set():
                return
            a, b = pairs[(k + n) % len(pairs)]
            cmid = f"k{k}-{n}"
            for _attempt in range(100):
                try:
                    out = await self.store.send(a, b, cmid, cmid, "text", TS)
                except StorageUnavailable:
                    self.failures += 1
                    self.failed.set()
                    await self.back.wait()
                    continue
                self.acked[(a, cmid)] = out
                self.progress.set()
                break
            else:
                raise AssertionError(f"{cmid} never stored")

    async def until_acked(self, n: int) -> None:
        target = len(self.acked) + n
        while len(self.acked) < target:
            self.progress.clear()
            await self.progress.wait()


async def test_outage_under_load(pg_url: str) -> None:
    u = make_url(pg_url)
    proxy = CuttableProxy(u.host or "127.0.0.1", u.port or 5432)
    await proxy.start()
    store = SqlStore(u.set(port=proxy.port).render_as_string(hide_password=False))
    await store.open()
    load = Load(store)
    clients = [asyncio.create_task(load.client(k)) for k in range(CLIENTS)]
    try:
        async with asyncio.timeout(60):
            await load.until_acked(100)
            load.back.clear()
            proxy.cut()  # the database goes away with writes in flight
            await load.failed.wait()
            with pytest.raises(StorageUnavailable):
                await store.ping()
            proxy.restore()
            load.back.set()
            await load.until_acked(100)  # the writer and the readers reconnected
            await store.ping()
            load.stop.set()
            await asyncio.gather(*clients)
        assert load.failures > 0
        await _check(store, load)
    finally:
        load.stop.set()
        load.back.set()
        for t in clients:
            t.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        await store.close()
        await proxy.close()


async def _check(store: SqlStore, load: Load) -> None:
    """Each message once; what was acknowledged is what is stored; seq and cur gap-free."""
    seqs: dict[str, list[int]] = defaultdict(list)
    for (sender, cmid), out in load.acked.items():
        stored = await store.find_sent(sender, cmid)
        assert stored is not None and stored.message == out.message
        assert (stored.sender_cur, stored.recipient_cur) == (out.sender_cur, out.recipient_cur)
        seqs[out.message.conv].append(out.message.seq)
    for conv_seqs in seqs.values():
        assert sorted(conv_seqs) == list(range(1, len(conv_seqs) + 1))
    total = 0
    for user in USERS:
        evs = await all_events(store, user)
        assert_contiguous([e.cur for e in evs])
        total += len(evs)
    assert total == 2 * len(load.acked)  # nothing stored that no client holds an ack for
