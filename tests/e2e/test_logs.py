"""`--log-format json`: one JSON object per line, with the node and the connection id;
never a message body or a token, in either format."""

from __future__ import annotations

import json
from pathlib import Path

from chatd.auth import Authenticator

from .conftest import SECRET
from .helpers import RawConn
from .test_drain import Node

BODY = "SECRET-BODY-do-not-log"


async def test_json_logs_carry_node_and_conn_and_no_body_or_token(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/chatd.db"
    node = await Node.start(db, "--log-format", "json", "--log-level", "DEBUG", "--node-id", "n7")
    token = Authenticator(SECRET).mint("alice")
    try:
        bob = await RawConn.open(node.url)
        await bob.hello(Authenticator(SECRET).mint("bob"))
        conn = await RawConn.open(node.url)
        assert (await conn.hello(token))["t"] == "welcome"
        sent = await conn.request({"t": "send", "id": 1, "to": "bob", "cmid": "c1", "body": BODY})
        assert sent["t"] == "sent"
        await bob.next(lambda m: m.get("t") == "msg")
        bad = await RawConn.open(node.url)
        await bad.hello(token + "x")  # a refused token: logged without the token
        for c in (bob, conn, bad):
            await c.close()
    finally:
        assert await node.stop() == 0
    out = "".join(node.lines)
    assert BODY not in out and token not in out and token.split(".")[1] not in out
    records = [json.loads(line) for line in node.lines if not line.startswith("chatd listening")]
    assert records and all(r["node"] == "n7" for r in records)
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    about_conns = [r for r in records if "conn" in r]
    assert any(r["msg"].startswith("hello user 'alice'") for r in about_conns), about_conns
    assert any("refused token" in r["msg"] for r in about_conns)
    assert all(isinstance(r["conn"], int) and not r["msg"].startswith("conn ") for r in about_conns)
