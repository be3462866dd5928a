"""The project's ChatClient against a real server: retries and reconnects."""

from __future__ import annotations

import asyncio

from chatd.server import Server
from protocol import Msg
from storage.base import StorageUnavailable

from .conftest import Clients
from .helpers import collect, wait_close_code


async def test_concurrent_send_retries_share_one_reconnect(srv: Server, clients: Clients) -> None:
    alice = await clients.connect(srv, "alice")
    bob = await clients.connect(srv, "bob")
    for _ in range(10):
        await alice.send_raw(b"\xc1")
    assert await wait_close_code(alice) == 1008
    sents = await asyncio.gather(*(alice.send("bob", f"m{i}", cmid=f"c{i}") for i in range(12)))
    assert sorted(s.seq for s in sents) == list(range(1, 13))
    # one new connection for alice, not one per retrying send (the limit is 10)
    sessions = [s.user for s in srv.hub.sessions()]
    assert sorted(sessions) == ["alice", "bob"]
    got = await collect(bob, 12, Msg)
    assert sorted(m.cmid for m in got) == sorted(f"c{i}" for i in range(12))


async def test_send_retry_after_unavailable_stores_once(srv: Server, clients: Clients) -> None:
    """`unavailable` is retried with the same cmid; a retry of a stored one is a dup."""
    alice = await clients.connect(srv, "alice")
    real_send = srv.store.send
    calls = 0

    def flaky(*args: object, **kw: object) -> asyncio.Future[object]:
        """The first write commits, but its outcome is reported as unknown."""
        nonlocal calls
        calls += 1
        first = calls == 1
        out: asyncio.Future[object] = asyncio.get_running_loop().create_future()

        def done(stored: asyncio.Future[object]) -> None:
            if first:
                out.set_exception(StorageUnavailable("commit outcome unknown"))
            else:
                out.set_result(stored.result())

        real_send(*args, **kw).add_done_callback(done)  # type: ignore[arg-type]
        return out

    srv.store.send = flaky  # type: ignore[method-assign,assignment]
    try:
        s = await alice.send("bob", "once", cmid="k1")
    finally:
        srv.store.send = real_send  # type: ignore[method-assign]
    assert calls == 2 and s.dup is True and s.seq == 1
    assert len((await alice.history("bob")).msgs) == 1


async def test_reconnect_resumes_from_cursor(srv: Server, clients: Clients) -> None:
    alice = await clients.connect(srv, "alice")
    bob = await clients.connect(srv, "bob")
    await alice.send("bob", "one")
    (m1,) = await collect(bob, 1)
    await bob.close()
    await alice.send("bob", "two")
    await bob.reconnect()
    (m2,) = await collect(bob, 1)
    assert (m1.body, m2.body) == ("one", "two") and m2.cur == m1.cur + 1
