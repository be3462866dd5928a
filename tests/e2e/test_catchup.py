"""Catch-up of a device without `since`: undelivered messages *to* the user only."""

from __future__ import annotations

from chatd.server import Server
from protocol import Msg, Receipt, Synced

from .conftest import Clients, MakeConfig, Servers
from .helpers import catch_up, collect


async def test_offline_messages_arrive_on_first_connect_in_order(
    servers: Servers, make_config: MakeConfig, clients: Clients, db_url: str
) -> None:
    srv = await servers.start(make_config(db=db_url))
    alice = await clients.connect(srv, "alice")
    sents = [await alice.send("bob", f"m{i}") for i in range(5)]
    assert [s.seq for s in sents] == [1, 2, 3, 4, 5]

    bob = await clients.connect(srv, "bob")
    assert bob.welcome is not None and bob.welcome.user == "bob"
    events = await catch_up(bob)
    msgs, synced = events[:-1], events[-1]
    assert all(isinstance(m, Msg) for m in msgs)
    assert [m.body for m in msgs] == [f"m{i}" for i in range(5)]
    assert [m.seq for m in msgs] == [1, 2, 3, 4, 5]
    assert [m.mid for m in msgs] == [s.mid for s in sents]
    assert {m.from_ for m in msgs} == {"alice"} and {m.to for m in msgs} == {"bob"}
    assert {m.conv for m in msgs} == {sents[0].conv}
    curs = [m.cur for m in msgs]
    assert curs == sorted(curs) and len(set(curs)) == 5
    assert isinstance(synced, Synced)
    assert synced.cur == bob.welcome.cur == 5
    assert bob.cursor == 5

    # live events follow, right after synced
    s6 = await alice.send("bob", "m5")
    (m6,) = await collect(bob, 1)
    assert m6.mid == s6.mid and m6.cur == 6


async def test_no_since_catch_up_has_no_own_messages_and_no_receipts(
    servers: Servers, make_config: MakeConfig, clients: Clients, db_url: str
) -> None:
    srv = await servers.start(make_config(db=db_url))
    alice = await clients.connect(srv, "alice")
    bob1 = await clients.connect(srv, "bob", device="phone")
    s1 = await alice.send("bob", "a1")
    (m1,) = await collect(bob1, 1)
    assert m1.mid == s1.mid
    await bob1.send("alice", "b1")  # bob's own message: in bob's stream
    await bob1.read(m1.conv, m1.seq)  # bob's own receipt (read implies delivered)
    (ra,) = await collect(alice, 1, Receipt)
    assert ra.by == "bob" and ra.kind == "read" and ra.upto == 1
    await alice.read(m1.conv, 2)  # alice's receipt: goes into bob's stream too
    s2 = await alice.send("bob", "a2")  # not yet delivered anywhere

    bob2 = await clients.connect(srv, "bob", device="tablet")
    events = await catch_up(bob2)
    assert [type(e) for e in events] == [Msg, Synced]
    m2 = events[0]
    assert m2.mid == s2.mid and m2.body == "a2" and m2.from_ == "alice"
    assert bob2.welcome is not None
    assert events[-1].cur == bob2.welcome.cur == await srv.store.last_cur("bob")
    assert bob2.cursor == bob2.welcome.cur

    # Not marked delivered yet: another new device gets it again.
    bob3 = await clients.connect(srv, "bob", device="watch")
    events = await catch_up(bob3)
    assert [type(e) for e in events] == [Msg, Synced] and events[0].mid == s2.mid

    # Once a device marks it delivered, a new device without since gets nothing.
    await bob2.delivered(m2.conv, m2.seq)
    bob4 = await clients.connect(srv, "bob", device="desk")
    events = await catch_up(bob4)
    assert [type(e) for e in events] == [Synced]
    assert events[0].cur == await srv.store.last_cur("bob")


async def test_welcome_cur_of_a_new_user_is_zero(srv: Server, clients: Clients) -> None:
    c = await clients.connect(srv, "newbie")
    events = await catch_up(c)
    assert c.welcome is not None and c.welcome.cur == 0
    assert events == [Synced(0)]
