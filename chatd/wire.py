"""Stored records -> frames on the wire. One place, so live and replayed events match."""

from __future__ import annotations

from typing import Any

from protocol import encode_map
from storage.base import Event, ReceiptRecord, StoredMessage

__all__ = ["encode_event", "msg_map", "receipt_map"]


def msg_map(m: StoredMessage, cur: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "t": "msg",
        "mid": m.mid,
        "conv": m.conv,
        "seq": m.seq,
        "from": m.sender,
        "to": m.recipient,
        "cmid": m.cmid,
        "ts": m.ts,
        "type": m.type,
        "body": m.body,
    }
    if cur is not None:
        out["cur"] = cur
    return out


def receipt_map(r: ReceiptRecord, cur: int) -> dict[str, Any]:
    return {
        "t": "receipt",
        "conv": r.conv,
        "kind": r.kind,
        "upto": r.upto,
        "by": r.by,
        "ts": r.ts,
        "cur": cur,
    }


def encode_event(ev: Event) -> bytes:
    if ev.message is not None:
        return encode_map(msg_map(ev.message, ev.cur))
    assert ev.receipt is not None
    return encode_map(receipt_map(ev.receipt, ev.cur))
