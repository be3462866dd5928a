"""Log setup: plain lines (the default) or one JSON object per line (`--log-format json`).

A JSON line holds `ts` (ISO 8601, UTC), `level`, `logger`, `node`, `msg`, and `conn`
when the line is about a connection: taken from `extra={"conn": id}`, or from the
"conn %d: ..." form every connection's line uses. Exceptions go in `exc`.

chatd never logs a message body or a token; as a second line of defence, anything
shaped like a JWT is replaced by `<token>` in both formats.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

__all__ = ["FORMATS", "JsonFormatter", "Redact", "setup_logging"]

FORMATS = ("plain", "json")
PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_CONN = re.compile(r"conn (\d+): ")


def _redact(text: str) -> str:
    return _JWT.sub("<token>", text) if "eyJ" in text else text


class Redact(logging.Filter):
    """Replaces JWT-shaped text in a record's message (its arguments merged in)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = _redact(msg)
        if clean is not msg:
            record.msg, record.args = clean, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        out: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "node": self.node,
        }
        conn = getattr(record, "conn", None)
        if conn is None and isinstance(record.msg, str) and record.msg.startswith("conn "):
            m = _CONN.match(msg)
            if m is not None:
                conn = int(m.group(1))
                msg = msg[m.end() :]
        if conn is not None:
            out["conn"] = conn
        out["msg"] = _redact(msg)
        if record.exc_info:
            out["exc"] = _redact(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False, default=str)


def _iso(created: float) -> str:
    secs = int(created)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    return f"{stamp}.{int((created - secs) * 1000):03d}Z"


def setup_logging(level: str, fmt: str = "plain", node: str = "") -> None:
    """Log to stderr at `level` in `fmt` ("plain" or "json"); libraries at WARNING."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(node) if fmt == "json" else logging.Formatter(PLAIN))
    handler.addFilter(Redact())
    handler.set_name("chatd")
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == "chatd":  # set up again (tests call main() many times)
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries log at WARNING: chatd logs connection open/close itself, with a connection id.
    for noisy in ("websockets", "alembic", "sqlalchemy", "aiosqlite", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
