"""Stored records -> frames on the wire (shaped by `protocol.server_frames`). One place,
so that live and replayed events are the same bytes."""

from __future__ import annotations

from typing import Any

from protocol import encode_map, msg_map, receipt_map
from storage.base import Event, ReceiptRecord, StoredMessage

__all__ = ["encode_event", "message_map", "receipt_event_map"]


def message_map(m: StoredMessage, cur: int | None) -> dict[str, Any]:
    """The `msg` frame of a stored message (`cur` None: in a history page)."""
    return msg_map(m.mid, m.conv, m.seq, m.sender, m.recipient, m.cmid, m.ts, m.type, m.body, cur)


def receipt_event_map(r: ReceiptRecord, cur: int) -> dict[str, Any]:
    """The `receipt` frame of a stored watermark move."""
    return receipt_map(r.conv, r.kind, r.upto, r.by, r.ts, cur)


def encode_event(ev: Event) -> bytes:
    if ev.message is not None:
        return encode_map(message_map(ev.message, ev.cur))
    assert ev.receipt is not None
    return encode_map(receipt_event_map(ev.receipt, ev.cur))
