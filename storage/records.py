"""Message rows <-> the records of `storage.base`, shared by the writes and the reads.

A body is stored as bytes with `is_text` saying whether it was a str (UTF-8).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from storage.base import SendOutcome, StoredMessage
from storage.schema import messages

__all__ = ["DUP_COL_NAMES", "MSG_COLS", "decode_body", "dup_from", "encode_body", "message_from"]

MSG_COLS = (
    messages.c.mid,
    messages.c.conv,
    messages.c.seq,
    messages.c.sender,
    messages.c.recipient,
    messages.c.cmid,
    messages.c.ts,
    messages.c.type,
    messages.c.body,
    messages.c.is_text,
)
"""The columns of a `StoredMessage`."""

DUP_COL_NAMES = (*(c.name for c in MSG_COLS), "sender_cur", "recipient_cur")
"""The columns of a stored message as a dup `SendOutcome` (`dup_from`)."""


def encode_body(body: str | bytes) -> tuple[bytes, bool]:
    if isinstance(body, str):
        return body.encode("utf-8"), True
    return bytes(body), False


def decode_body(body: bytes, is_text: bool) -> str | bytes:
    return bytes(body).decode("utf-8") if is_text else bytes(body)


def message_from(m: Mapping[Any, Any], prefix: str = "") -> StoredMessage:
    """The message of row `m` (its `MSG_COLS`, named with `prefix`)."""
    return StoredMessage(
        mid=int(m[prefix + "mid"]),
        conv=m[prefix + "conv"],
        seq=int(m[prefix + "seq"]),
        sender=m[prefix + "sender"],
        recipient=m[prefix + "recipient"],
        cmid=m[prefix + "cmid"],
        ts=int(m[prefix + "ts"]),
        type=m[prefix + "type"],
        body=decode_body(m[prefix + "body"], bool(m[prefix + "is_text"])),
    )


def dup_from(m: Mapping[Any, Any]) -> SendOutcome:
    """The stored message of row `m` (its `DUP_COL_NAMES`) as the outcome of a repeat."""
    return SendOutcome(
        message=message_from(m),
        sender_cur=int(m["sender_cur"]),
        recipient_cur=int(m["recipient_cur"]),
        dup=True,
    )
