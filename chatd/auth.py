"""Identity: JWTs whose `sub` is the user id.

Two ways to hold keys:

- a shared secret (HS256/384/512): the node verifies tokens and can mint them too
  (`chatd token`); the default for one machine with no setup;
- public keys (RS256, ES256, ... from a PEM file or a JWKS file): the node only
  verifies; an account service holds the signing key and issues the tokens.

Whatever the key, a token is refused unless: its signature verifies with an allowed
algorithm (never `none`); `exp` is a number (not a numeric string) and not past; its
lifetime (`exp - iat`, or `exp - now` without `iat`) is at most `max_ttl`; `iss` and
`aud` match when the node is configured with them; `sub` is a user id other than `.`
and `..`. The reasons of a refusal are fixed strings: never a claim or the token.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from protocol import is_user_id

from .errors import AuthError, ConfigError

log = logging.getLogger("chatd.auth")

__all__ = [
    "DEFAULT_MAX_TTL",
    "PUBLIC_KEY_ALGORITHMS",
    "SECRET_ALGORITHMS",
    "Authenticator",
    "TokenPolicy",
    "load_or_create_secret",
    "load_public_keys",
]

DEFAULT_MAX_TTL = 7 * 86400.0
"""Longest token lifetime accepted by default: 7 days."""

SECRET_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_KEY_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}
)
_RESERVED_SUBS = frozenset({".", ".."})
"""User ids a token may not name: they read as paths wherever a user id is one."""


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """What a valid token must say besides its signature."""

    leeway: float = 0.0
    """Seconds a token is still accepted after its `exp` (clock skew of its issuer)."""
    max_ttl: float = DEFAULT_MAX_TTL
    """Longest lifetime: `exp - iat` (or `exp - now` when the token has no `iat`)."""
    issuer: str = ""
    """Required `iss` (unset: any or none)."""
    audience: str = ""
    """Required in `aud` (unset: a token with an `aud` is refused, as PyJWT does)."""


class Authenticator:
    """Verifies tokens, and mints them when it holds a secret. `alg: none` and any
    algorithm not listed are refused."""

    def __init__(
        self,
        secret: str = "",
        algorithms: Sequence[str] = (),
        leeway: float = 0.0,
        *,
        keys: Sequence[jwt.PyJWK] = (),
        policy: TokenPolicy | None = None,
    ) -> None:
        """`secret` (HS*) or `keys` (public keys: verify only), not both. `algorithms`:
        those accepted (empty: HS256 for a secret, each key's own for public keys)."""
        if any(a.lower() == "none" for a in algorithms):
            raise ConfigError("the JWT algorithm 'none' is never accepted")
        if bool(secret) == bool(keys):
            raise ConfigError("give either a JWT secret or public keys (an empty secret too)")
        self._policy = policy if policy is not None else TokenPolicy(leeway=leeway)
        self._secret = secret
        self._keys = list(keys)
        if secret:
            self._algorithms = list(algorithms) or ["HS256"]
            wrong = set(self._algorithms) - SECRET_ALGORITHMS
            what = "with a shared secret only HS256, HS384 and HS512 are accepted"
        else:
            self._algorithms = list(algorithms) or sorted({k.algorithm_name for k in keys})
            wrong = set(self._algorithms) - PUBLIC_KEY_ALGORITHMS
            what = "with public keys only RS*, PS* and ES* algorithms are accepted"
        if wrong:
            raise ConfigError(f"JWT algorithms {sorted(wrong)}: {what}")

    @property
    def can_mint(self) -> bool:
        return bool(self._secret)

    def verify(self, token: str, now: float | None = None) -> str:
        """The user id of a valid token, else AuthError (with a fixed reason)."""
        pol = self._policy
        required = ["exp", "sub"] + ["iss"] * bool(pol.issuer) + ["aud"] * bool(pol.audience)
        try:
            claims = jwt.decode(
                token,
                self._key_for(token),
                algorithms=self._algorithms,
                leeway=pol.leeway,
                issuer=pol.issuer or None,
                audience=pol.audience or None,
                options={"require": required},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {type(exc).__name__}") from None
        _check_times(claims, pol.max_ttl, time.time() if now is None else now)
        sub = claims.get("sub")
        if not is_user_id(sub) or sub in _RESERVED_SUBS:
            raise AuthError("token 'sub' is not a valid user id")
        assert isinstance(sub, str)
        return sub

    def _key_for(self, token: str) -> str | jwt.PyJWK:
        if self._secret:
            return self._secret
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {type(exc).__name__}") from None
        if kid is None:
            if len(self._keys) == 1:
                return self._keys[0]
            raise AuthError("token has no 'kid' and there are several keys")
        for key in self._keys:
            if key.key_id == kid:
                return key
        raise AuthError("token 'kid' names no known key")

    def mint(self, user: str, ttl: float = 86400.0, now: float | None = None) -> str:
        """A token for `user` valid `ttl` seconds (with the node's `iss` and `aud`)."""
        if not self._secret:
            raise ConfigError(
                "this node only verifies tokens (it has public keys, no signing key): "
                "tokens come from the service that holds the private key"
            )
        if not is_user_id(user) or user in _RESERVED_SUBS:
            raise ValueError("user ids are 1 to 64 characters of A-Za-z0-9_.- (not . or ..)")
        most = self._policy.max_ttl
        if ttl > most:
            raise ValueError(f"ttl {ttl:g} s is over the longest token lifetime ({most:g} s)")
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {"sub": user, "iat": issued, "exp": issued + int(ttl)}
        if self._policy.issuer:
            claims["iss"] = self._policy.issuer
        if self._policy.audience:
            claims["aud"] = self._policy.audience
        return jwt.encode(claims, self._secret, algorithm=self._algorithms[0])


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_times(claims: Mapping[str, Any], max_ttl: float, now: float) -> None:
    """`exp`, `iat`, `nbf` are numbers (PyJWT takes "123" too); the lifetime is bounded."""
    for name in ("exp", "iat", "nbf"):
        if name in claims and not _is_number(claims[name]):
            raise AuthError(f"token '{name}' is not a number")
    iat = claims.get("iat")
    start = now if iat is None else min(float(iat), now)
    if float(claims["exp"]) - start > max_ttl:
        raise AuthError("token lifetime is over the maximum")


def load_public_keys(path: Path) -> list[jwt.PyJWK]:
    """The public keys in a PEM file (one RSA or EC key) or a JWKS / JWK JSON file.

    Private keys are refused: a chat node verifies and never holds a signing key."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the JWT public key file {path}: {exc}") from None
    if "PRIVATE KEY" in text:
        raise ConfigError(f"{path} holds a private key: give chatd the public key only")
    if text.lstrip().startswith("-----BEGIN"):
        return [_pem_key(text, path)]
    try:
        doc = json.loads(text)
    except ValueError:
        raise ConfigError(f"{path} is neither a PEM public key nor a JWKS file") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a JWKS file is a JSON object")
    jwks = doc.get("keys", [doc])
    if not isinstance(jwks, list) or not jwks:
        raise ConfigError(f"{path}: no keys")
    return [_jwk_key(jwk, path) for jwk in jwks]


def _pem_key(text: str, path: Path) -> jwt.PyJWK:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(text.encode())
    except ValueError:
        raise ConfigError(f"{path}: not a PEM public key") from None
    if isinstance(key, rsa.RSAPublicKey):
        return jwt.PyJWK(RSAAlgorithm.to_jwk(key, as_dict=True), "RS256")
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return jwt.PyJWK(ECAlgorithm.to_jwk(key, as_dict=True), "ES256")
    raise ConfigError(f"{path}: only RSA and EC P-256 public keys are supported")


def _jwk_key(jwk: object, path: Path) -> jwt.PyJWK:
    if not isinstance(jwk, dict):
        raise ConfigError(f"{path}: a key is not a JSON object")
    if jwk.get("kty") == "oct":
        raise ConfigError(f"{path}: a symmetric key: use --jwt-secret for HS* tokens")
    if "d" in jwk:
        raise ConfigError(f"{path} holds a private key: give chatd the public keys only")
    try:
        key = jwt.PyJWK(jwk)
    except jwt.PyJWTError as exc:
        raise ConfigError(f"{path}: unusable key ({type(exc).__name__})") from None
    if key.algorithm_name not in PUBLIC_KEY_ALGORITHMS:
        raise ConfigError(f"{path}: algorithm {key.algorithm_name} is not supported")
    return key


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
