"""Wire limits: the sizes and page lengths a client can rely on. Defaults are the
contract's; all configurable. (The server's policy, such as rates and connections
per user, is chatd's: `chatd.config.Policy`.)"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits"]


@dataclass(frozen=True, slots=True)
class Limits:
    max_frame: int = 64 * 1024
    """Largest WebSocket message (after decompression); above it: close 1009."""
    max_body: int = 16 * 1024
    """Largest `send.body` in bytes (UTF-8 bytes for str); above it: `too_large`."""
    history_default: int = 50
    history_max: int = 200
    history_bytes: int = 1024 * 1024
    """Body bytes in one `history` reply at most: a page that would hold more ends
    early (at least one message), with `more: true`. Bounds the largest server frame."""
    convs_default: int = 100
    convs_max: int = 500
