"""A bare WebSocket relay: the baseline for chatd's costs.

It speaks just enough of chatd.v1 for the load tester: `hello` -> `welcome` +
`synced` (the token's `sub` is read, not verified), `send` -> `sent` to the
sender and `msg` to the recipient's socket, `delivered`/`read` -> a `receipt`
to both people, `typing` relayed, `history` answered empty, `ping` -> `pong`.
No storage, no cursors kept, nothing replayed. Same library (websockets) and
codec (msgpack) as chatd, so the difference is chatd's own work.

    python -m loadtest.relay --port 0    # prints "relay listening on ws://HOST:PORT/ws"
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import signal
import time
from collections.abc import Sequence
from typing import Any

import msgpack
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State
from websockets.typing import Subprotocol

__all__ = ["Relay", "main"]


def _sub(token: Any) -> str | None:
    try:
        payload = str(token).split(".")[1]
        payload += "=" * (-len(payload) % 4)
        sub = json.loads(base64.urlsafe_b64decode(payload))["sub"]
        return str(sub)
    except Exception:
        return None


class Relay:
    def __init__(self) -> None:
        self.conns: dict[str, set[ServerConnection]] = {}
        self.seq: dict[str, int] = {}
        self.cur: dict[str, int] = {}
        self.mid = 0

    def _cur(self, user: str) -> int:
        c = self.cur.get(user, 0) + 1
        self.cur[user] = c
        return c

    def _to(self, user: str, frame: dict[str, Any]) -> None:
        data = msgpack.packb(frame, use_bin_type=True)
        for ws in self.conns.get(user, ()):
            self._write(ws, data)

    @staticmethod
    def _write(ws: ServerConnection, data: bytes) -> None:
        """Write now, in order, without a task per frame (websockets' sans-I/O core)."""
        if ws.protocol.state is not State.OPEN:
            return
        ws.protocol.send_binary(data)
        ws.send_data()

    async def handle(self, ws: ServerConnection) -> None:
        user: str | None = None
        try:
            async for data in ws:
                if not isinstance(data, bytes):
                    continue
                try:
                    m = msgpack.unpackb(data, raw=False)
                    t = m["t"]
                except Exception:
                    continue
                if user is None:
                    if t != "hello":
                        continue
                    user = _sub(m.get("token"))
                    if user is None:
                        await ws.close(1008)
                        return
                    self.conns.setdefault(user, set()).add(ws)
                    c = self.cur.get(user, 0)
                    ts = int(time.time() * 1000)
                    self._write(
                        ws,
                        msgpack.packb(
                            {
                                "t": "welcome",
                                "id": m.get("id"),
                                "user": user,
                                "device": m.get("device") or "default",
                                "cur": c,
                                "ts": ts,
                            }
                        ),
                    )
                    self._write(ws, msgpack.packb({"t": "synced", "cur": c}))
                elif t == "send":
                    to = str(m["to"])
                    conv = "|".join(sorted((user, to)))
                    seq = self.seq.get(conv, 0) + 1
                    self.seq[conv] = seq
                    self.mid += 1
                    ts = int(time.time() * 1000)
                    self._write(
                        ws,
                        msgpack.packb(
                            {
                                "t": "sent",
                                "id": m.get("id"),
                                "cmid": m["cmid"],
                                "mid": self.mid,
                                "conv": conv,
                                "seq": seq,
                                "ts": ts,
                                "cur": self._cur(user),
                            }
                        ),
                    )
                    self._to(
                        to,
                        {
                            "t": "msg",
                            "mid": self.mid,
                            "conv": conv,
                            "seq": seq,
                            "from": user,
                            "to": to,
                            "cmid": m["cmid"],
                            "ts": ts,
                            "type": "text",
                            "body": m["body"],
                            "cur": self._cur(to),
                        },
                    )
                elif t in ("delivered", "read"):
                    conv = str(m["conv"])
                    ts = int(time.time() * 1000)
                    for who in conv.split("|"):
                        self._to(
                            who,
                            {
                                "t": "receipt",
                                "conv": conv,
                                "kind": t,
                                "upto": m["upto"],
                                "by": user,
                                "ts": ts,
                                "cur": self._cur(who),
                            },
                        )
                elif t == "typing":
                    self._to(str(m["to"]), {"t": "typing", "from": user, "on": bool(m["on"])})
                elif t == "history":
                    self._write(
                        ws,
                        msgpack.packb(
                            {
                                "t": "history",
                                "id": m.get("id"),
                                "conv": "",
                                "msgs": [],
                                "more": False,
                                "delivered": 0,
                                "read": 0,
                            }
                        ),
                    )
                elif t == "ping":
                    self._write(
                        ws,
                        msgpack.packb(
                            {"t": "pong", "id": m.get("id"), "ts": int(time.time() * 1000)}
                        ),
                    )
        except ConnectionClosed:
            pass
        finally:
            if user is not None:
                self.conns.get(user, set()).discard(ws)


async def _main(host: str, port: int) -> None:
    relay = Relay()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serve(
        relay.handle,
        host,
        port,
        subprotocols=[Subprotocol("chatd.v1")],
        max_size=1 << 16,
        ping_interval=20,
        ping_timeout=20,
    ) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(f"relay listening on ws://{host}:{bound}/ws", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loadtest.relay", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args(argv)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(_main(a.host, a.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
