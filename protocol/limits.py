"""Protocol limits. Defaults are the ones of the wire contract; all configurable."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits"]


@dataclass(frozen=True, slots=True)
class Limits:
    max_frame: int = 64 * 1024
    """Largest WebSocket message (after decompression); above it: close 1009."""
    max_body: int = 16 * 1024
    """Largest `send.body` in bytes (UTF-8 bytes for str); above it: `too_large`."""
    send_rate: float = 20.0
    """Sends per second per user (token bucket refill)."""
    send_burst: int = 100
    """Token bucket size for sends."""
    typing_rate: float = 5.0
    """Typing frames per second per user (burst of the same size)."""
    max_connections_per_user: int = 10
    hello_timeout: float = 10.0
    """Seconds a new connection has to send `hello`."""
    max_bad_frames: int = 10
    """The Nth `bad_frame` in a row is answered, then the connection closes 1008."""
    max_frame_rate: int = 1000
    """WebSocket messages per second one connection may send (averaged over runs of
    this many); faster: close 1008. Far above what any client needs (sends are 20/s)."""
    history_default: int = 50
    history_max: int = 200
    history_bytes: int = 1024 * 1024
    """Body bytes in one `history` reply at most: a page that would hold more ends
    early (at least one message), with `more: true`. Bounds the largest server frame."""
    convs_default: int = 100
    convs_max: int = 500
