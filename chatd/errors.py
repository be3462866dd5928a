"""Root exception of the `chatd` package."""

from __future__ import annotations


class ChatdError(Exception):
    """Root of every error raised by the `chatd` package."""


class ConfigError(ChatdError):
    """The configuration is wrong: the operator's fault, said at startup."""


class AuthError(ChatdError):
    """A token was refused. The text is safe to log, never sent to the peer."""
