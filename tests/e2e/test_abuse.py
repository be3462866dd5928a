"""What one client can do to others, and cannot: forged log lines, idle sockets that hold the
node's open files (see also test_budget.py), tokens outside the node's policy."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from chatd.server import Server

from .conftest import Clients, MakeConfig, Servers
from .helpers import is_t

ANSI_DEVICE = "ph\none\x1b[31m\r\n2026-01-01 WARNING chatd.auth: fake\x1b[0m"


class _Waiter(logging.Handler):
    """Keeps every record; sets an event when one contains `until`."""

    def __init__(self, until: str) -> None:
        super().__init__(logging.DEBUG)
        self.until = until
        self.records: list[logging.LogRecord] = []
        self.seen = asyncio.Event()
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if self.until in record.getMessage():
            self.seen.set()

    def text(self) -> str:
        return "".join(self.format(r) + "\n" for r in self.records)


@pytest.fixture
def chatd_log() -> Iterator[_Waiter]:
    waiter = _Waiter(": closed (")
    root = logging.getLogger("chatd")
    old = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(waiter)
    try:
        yield waiter
    finally:
        root.removeHandler(waiter)
        root.setLevel(old)


async def test_a_device_with_newlines_and_escapes_cannot_forge_a_log_line(
    srv: Server, clients: Clients, chatd_log: _Waiter
) -> None:
    raw = await clients.raw_hello(srv, "mallory", device=ANSI_DEVICE)
    await raw.close()
    async with asyncio.timeout(5):
        await chatd_log.seen.wait()
    text = chatd_log.text()
    assert "mallory" in text and "hello user" in text
    lines = text.splitlines()
    assert len(lines) == len(chatd_log.records), "a record spans more than one line"
    assert "\x1b" not in text and "\r" not in text
    assert not any(line.startswith("2026-01-01") for line in lines)
    assert r"ph\none\x1b[31m" in text  # escaped, still readable


# ----------------------------------------------------------------- tokens


async def test_a_node_with_the_account_services_public_key(
    servers: Servers, make_config: MakeConfig, clients: Clients, tmp_path: Path
) -> None:
    """The account service signs (RS256, its private key); the node verifies only."""
    signer = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = tmp_path / "accounts.pem"
    pub.write_bytes(
        signer.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    cfg = make_config(jwt_secret="", jwt_public_key=str(pub), jwt_issuer="accounts")
    srv = await servers.start(cfg)
    now = int(time.time())

    def token(**over: object) -> str:
        claims = {"sub": "alice", "iss": "accounts", "iat": now, "exp": now + 3600, **over}
        return jwt.encode(claims, signer, algorithm="RS256")

    ok = await clients.raw(srv)
    assert (await ok.hello(token()))["t"] == "welcome"
    for bad in (
        token(exp=str(now + 3600)),  # a numeric string
        token(exp=253402300799),  # the year 9999
        token(iss="elsewhere"),
        token(sub=".."),
        jwt.encode({"sub": "alice", "exp": now + 60}, "a" * 64, algorithm="HS256"),
    ):
        raw = await clients.raw(srv)
        err = await raw.hello(bad)
        assert err["t"] == "error" and err["code"] == "unauthorized", err
        assert await raw.wait_closed() == 1008
    await ok.send({"t": "ping", "id": 1})
    await ok.next(is_t("pong"))
