"""Identity: JWTs (HS256 by default) whose `sub` is the user id."""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

import jwt

from protocol import is_user_id

from .errors import AuthError, ConfigError

log = logging.getLogger("chatd.auth")

__all__ = ["Authenticator", "load_or_create_secret"]


class Authenticator:
    """Verifies and mints tokens. `alg: none` and any algorithm not listed are refused."""

    def __init__(
        self, secret: str, algorithms: Sequence[str] = ("HS256",), leeway: float = 0.0
    ) -> None:
        """`leeway`: seconds a token is still accepted after its `exp` (clock skew between
        the token's issuer and this server); 0: an expired token is refused at once."""
        if not secret:
            raise ConfigError("the JWT secret is empty")
        if any(a.lower() == "none" for a in algorithms):
            raise ConfigError("the JWT algorithm 'none' is never accepted")
        self._secret = secret
        self._algorithms = list(algorithms)
        self._leeway = leeway

    def verify(self, token: str) -> str:
        """The user id of a valid token, else AuthError."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=self._algorithms,
                leeway=self._leeway,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {type(exc).__name__}") from None
        sub = claims.get("sub")
        if not is_user_id(sub):
            raise AuthError("token 'sub' is not a valid user id")
        assert isinstance(sub, str)
        return sub

    def mint(self, user: str, ttl: float = 86400.0, now: float | None = None) -> str:
        if not is_user_id(user):
            raise ValueError("user ids are 1 to 64 characters of A-Za-z0-9_.-")
        issued = int(time.time() if now is None else now)
        claims = {"sub": user, "iat": issued, "exp": issued + int(ttl)}
        return jwt.encode(claims, self._secret, algorithm=self._algorithms[0])


def load_or_create_secret(path: Path) -> str:
    """Read the secret file, or create it (mode 0600) with a random secret."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        pass
    else:
        if not text:
            raise ConfigError(f"JWT secret file {path} is empty")
        return text
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first
        return load_or_create_secret(path)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    log.warning("created a new JWT secret in %s (set CHATD_JWT_SECRET to use your own)", path)
    return secret
