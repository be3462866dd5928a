"""Root exception of the `chatd` package."""

from __future__ import annotations


class ChatdError(Exception):
    """Root of every error that the `chatd` package defines and raises. (Errors of the
    layers below reach callers as their own roots: `protocol.ProtocolError`,
    `storage.base.StorageError`, and websockets' `ConnectionClosed`.)"""


class ConfigError(ChatdError):
    """The configuration is wrong: the operator's fault, said at startup."""


class AuthError(ChatdError):
    """A token was refused. The text is safe to log, never sent to the peer."""
