"""The reads, answered as frames: a `history` page and the `convs` list (the session
holds the frames after a read until its answer is written, see `Session.hold_for`)."""

from __future__ import annotations

from typing import Any

from protocol import (
    ConvsRequest,
    ErrorCode,
    FrameError,
    HistoryRequest,
    body_size,
    conv_info_map,
    convs_map,
    encode_map,
    history_map,
)

from .context import Context
from .wire import message_map

__all__ = ["convs_reply", "history_reply"]


async def history_reply(ctx: Context, user: str, f: HistoryRequest) -> bytes:
    """A `history` page: at most `limit` messages, and at most `history_bytes` of bodies."""
    if f.with_ == user:
        raise FrameError(ErrorCode.BAD_REQUEST, "'with' must be another user")
    limits = ctx.config.limits
    limit = f.limit if f.limit is not None else limits.history_default
    if limit > limits.history_max:
        raise FrameError(ErrorCode.BAD_REQUEST, f"'limit' is at most {limits.history_max}")
    page = await ctx.store.history(user, f.with_, f.before, limit)
    msgs: list[dict[str, Any]] = []
    more = page.more
    size = 0
    for m in page.messages:  # newest first: a page cut short ends at an older `seq`
        size += body_size(m.body)
        if msgs and size > limits.history_bytes:
            more = True
            break
        msgs.append(message_map(m, None))
    return encode_map(history_map(f.id, page.conv, msgs, more, page.delivered, page.read))


async def convs_reply(ctx: Context, user: str, f: ConvsRequest) -> bytes:
    """The user's conversations, newest first, with unread counts."""
    limits = ctx.config.limits
    limit = f.limit if f.limit is not None else limits.convs_default
    if limit > limits.convs_max:
        raise FrameError(ErrorCode.BAD_REQUEST, f"'limit' is at most {limits.convs_max}")
    rows = await ctx.store.convs(user, limit)
    convs = [
        conv_info_map(c.conv, c.peer, c.seq, c.ts, c.unread, c.delivered, c.read) for c in rows
    ]
    return encode_map(convs_map(f.id, convs))
