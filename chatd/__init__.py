"""chatd: a real-time direct-messaging server (WebSocket + MessagePack)."""

__version__ = "0.1.0"
