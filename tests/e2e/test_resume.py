"""Resume with `since`: exactly the unseen events, once each, in `cur` order,
also across a server restart on the same database."""

from __future__ import annotations

from typing import Any

from chatd.client import ChatClient
from chatd.server import Server
from protocol import Msg, Receipt, Synced

from .conftest import Clients, MakeConfig, Servers, ws_url
from .helpers import collect, is_t, wait_close_code

STORED = ("msg", "receipt")


def stream_part(
    frames: list[dict[str, Any]],
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(welcome, catch-up frames, synced) of a raw connection's frames."""
    kinds = [f["t"] for f in frames]
    w = kinds.index("welcome")
    s = kinds.index("synced")
    return frames[w], frames[w + 1 : s], frames[s]


async def test_resume_with_since_across_server_restart(
    servers: Servers, make_config: MakeConfig, clients: Clients, db_url: str
) -> None:
    cfg = make_config(db=db_url)
    srv1 = await servers.start(cfg)
    alice = await clients.connect(srv1, "alice")
    bob = await clients.connect(srv1, "bob", device="phone")
    for i in range(5):
        await alice.send("bob", f"a{i}")
    first = await collect(bob, 3)  # bob processes 3 of the 5
    assert [m.body for m in first] == ["a0", "a1", "a2"]
    await bob.read(first[0].conv, 2)  # an own receipt event, cur 6
    cursor = bob.cursor
    assert cursor == 3  # the receipt and a3, a4 were not processed (recv'd) yet

    await servers.stop(srv1)
    assert await wait_close_code(bob) == 1001
    assert await wait_close_code(alice) == 1001

    srv2 = await servers.start(cfg)
    alice2 = await clients.connect(srv2, "alice", since=alice.cursor)
    bob_laptop = await clients.connect(srv2, "bob", device="laptop", since=0)
    for i in range(5, 8):
        await alice2.send("bob", f"a{i}")
    b1 = await bob_laptop.send("alice", "from laptop")  # bob's own message
    await alice2.read(b1.conv, b1.seq)  # alice's receipt lands in bob's stream

    last = await srv2.store.last_cur("bob")
    stored = await srv2.store.events("bob", cursor, last, 1000)
    assert [e.cur for e in stored] == list(range(cursor + 1, last + 1))

    raw = await clients.raw(srv2)
    welcome = await raw.hello(srv2.ctx.auth.mint("bob"), since=cursor, device="phone")
    assert welcome["t"] == "welcome" and welcome["cur"] == last
    await raw.next(is_t("synced"))
    pong = await raw.request({"t": "ping", "id": "p"})
    assert pong["t"] == "pong"
    w, catchup, synced = stream_part(raw.frames)
    assert synced["cur"] == w["cur"] == last
    # exactly the unseen events, each once, in cur order, nothing after synced
    assert all(f["t"] in STORED for f in catchup)
    assert [f["cur"] for f in catchup] == list(range(cursor + 1, last + 1))
    assert raw.frames[raw.frames.index(synced) + 1 :] == [pong]
    bodies = [f["body"] for f in catchup if f["t"] == "msg"]
    assert bodies == ["a3", "a4", "a5", "a6", "a7", "from laptop"]
    receipts = [(f["by"], f["kind"], f["upto"]) for f in catchup if f["t"] == "receipt"]
    assert receipts == [("bob", "read", 2), ("alice", "read", b1.seq)]
    # the replayed own message carries bob's cur and from=bob
    own = next(f for f in catchup if f["t"] == "msg" and f["from"] == "bob")
    assert own["mid"] == b1.mid and own["cur"] == b1.cur
    assert not raw.malformed

    # live events continue right after synced, at last + 1
    s = await alice2.send("bob", "live")
    live = await raw.next(is_t("msg", body="live"))
    assert live["cur"] == last + 1 and live["mid"] == s.mid


async def test_resume_with_chatclient_cursor_after_restart(
    servers: Servers, make_config: MakeConfig, clients: Clients
) -> None:
    """The ChatClient's own cursor, passed back as since, gives every event once."""
    cfg = make_config()
    srv1 = await servers.start(cfg)
    alice = await clients.connect(srv1, "alice")
    bob = await clients.connect(srv1, "bob")
    for i in range(4):
        await alice.send("bob", f"x{i}")
    got = await collect(bob, 2)
    await servers.stop(srv1)
    srv2 = await servers.start(cfg)
    alice2 = await clients.connect(srv2, "alice")
    for i in range(4, 6):
        await alice2.send("bob", f"x{i}")
    bob2 = await clients.connect(srv2, "bob", since=bob.cursor)
    rest = await collect(bob2, 4)
    assert [m.body for m in got + rest] == [f"x{i}" for i in range(6)]
    assert [m.cur for m in got + rest] == list(range(1, 7))
    assert isinstance(await bob2.recv(timeout=5), Synced)
    assert bob2.pending_events() == 0


async def test_welcome_and_synced_cur_match_and_since_above_newest(
    srv: Server, clients: Clients
) -> None:
    alice = await clients.connect(srv, "alice")
    for i in range(3):
        await alice.send("bob", f"m{i}")
    for since in (0, 2, 3, 1000):
        raw = await clients.raw(srv)
        w = await raw.hello(srv.ctx.auth.mint("bob"), since=since)
        synced = await raw.next(is_t("synced"))
        assert w["cur"] == synced["cur"] == 3
        _, catchup, _ = stream_part(raw.frames)
        assert [f["cur"] for f in catchup] == list(range(since + 1, 4))
        await raw.close()


async def test_chatclient_dedupes_own_message_on_replay(srv: Server, clients: Clients) -> None:
    """A replay after since holds the user's own messages as msg; the client drops
    the one it saw as sent (dedupe by mid) but its cursor still moves past it."""
    alice = await clients.connect(srv, "alice")
    s = await alice.send("bob", "mine")
    url = ws_url(srv)
    again = ChatClient(url, srv.ctx.auth.mint("alice"), since=0)
    clients.opened.append(again)
    await again.open()
    (ev,) = await collect(again, 1, Msg)
    assert ev.mid == s.mid and ev.from_ == "alice" and ev.cur == s.cur
    assert not isinstance(ev, Receipt)


async def test_client_adopts_synced_cur_below_its_since(srv: Server, clients: Clients) -> None:
    """A cursor ahead of the server's stream (a restored database) must not make the
    client skip new events: it adopts synced.cur, so its next resume replays them."""
    alice = await clients.connect(srv, "alice")
    await alice.send("bob", "before")
    bob = ChatClient(ws_url(srv), srv.ctx.auth.mint("bob"), since=1000)
    clients.opened.append(bob)
    await bob.open()
    assert isinstance(await bob.recv(timeout=5), Synced)
    assert bob.cursor == 1
    await bob.close()
    await alice.send("bob", "after")
    await bob.open()
    (ev,) = await collect(bob, 1, Msg)
    assert ev.body == "after" and ev.cur == 2
