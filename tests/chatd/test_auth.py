"""Token policy: numeric times, the longest lifetime, issuer and audience, reserved user ids,
and public keys (RS256 / ES256 from a PEM or a JWKS file) on a node that only verifies."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm

from chatd.auth import Authenticator, TokenPolicy, load_public_keys
from chatd.cli import main
from chatd.config import Config
from chatd.errors import AuthError, ConfigError
from chatd.server import authenticator_for

SECRET = "k" * 64
NOW = time.time()


def hs(claims: dict[str, Any], secret: str = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=alg)


def hs256_by_hand(claims: dict[str, Any], secret: bytes) -> str:
    """HS256 with any bytes as the secret (PyJWT refuses to sign with a PEM key)."""

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signing_input = head + b"." + b64(json.dumps(claims).encode())
    sig = b64(hmac.new(secret, signing_input, hashlib.sha256).digest())
    return (signing_input + b"." + sig).decode()


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "iat": int(NOW), "exp": int(NOW) + 3600}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, path: Path) -> Path:
    data = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------- claims


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(hs(claims(exp=str(int(NOW) + 3600))), id="exp-numeric-string"),
        pytest.param(hs(claims(iat=str(int(NOW)))), id="iat-numeric-string"),
        pytest.param(hs(claims(exp=True)), id="exp-bool"),
        pytest.param(hs(claims(exp=253402300799)), id="exp-year-9999"),
        pytest.param(hs(claims(iat=None, exp=253402300799)), id="exp-year-9999-no-iat"),
        pytest.param(hs(claims(iat=int(NOW) - 30 * 86400, exp=int(NOW) + 60)), id="old-iat"),
        pytest.param(hs(claims(sub="..")), id="sub-dotdot"),
        pytest.param(hs(claims(sub=".")), id="sub-dot"),
        pytest.param(hs(claims(sub="al/ice")), id="sub-slash"),
        pytest.param(hs(claims(aud="other-app")), id="aud-not-configured"),
    ],
)
def test_refused_claims(token: str) -> None:
    with pytest.raises(AuthError):
        Authenticator(SECRET).verify(token)


def test_lifetime_at_the_maximum_is_accepted_and_the_maximum_is_configurable() -> None:
    week = 7 * 86400
    assert Authenticator(SECRET).verify(hs(claims(exp=int(NOW) + week))) == "alice"
    assert Authenticator(SECRET).verify(hs(claims(iat=None, exp=int(NOW) + 3600))) == "alice"
    short = Authenticator(SECRET, policy=TokenPolicy(max_ttl=600))
    with pytest.raises(AuthError, match="lifetime"):
        short.verify(hs(claims()))
    assert short.verify(hs(claims(exp=int(NOW) + 600))) == "alice"
    with pytest.raises(ValueError, match="longest token lifetime"):
        short.mint("alice", ttl=3600)


def test_issuer_and_audience_are_checked_when_set() -> None:
    auth = Authenticator(SECRET, policy=TokenPolicy(issuer="accounts", audience="chat"))
    assert auth.verify(hs(claims(iss="accounts", aud="chat"))) == "alice"
    assert auth.verify(hs(claims(iss="accounts", aud=["web", "chat"]))) == "alice"
    for bad in (
        claims(iss="evil", aud="chat"),
        claims(aud="chat"),
        claims(iss="accounts", aud="web"),
        claims(iss="accounts"),
    ):
        with pytest.raises(AuthError):
            auth.verify(hs(bad))
    assert auth.verify(auth.mint("bob")) == "bob"  # chatd token puts both in
    unset = Authenticator(SECRET)
    assert unset.verify(hs(claims(iss="anyone"))) == "alice"


def test_reasons_are_fixed_strings_without_claims() -> None:
    auth = Authenticator(SECRET, policy=TokenPolicy(issuer="accounts"))
    with pytest.raises(AuthError) as info:
        auth.verify(hs(claims(iss="evil\nWARNING forged")))
    assert "evil" not in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------- public keys


def test_rs256_from_a_pem_public_key(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    auth = Authenticator(keys=load_public_keys(pem(rsa_key, tmp_path / "pub.pem")))
    assert auth.verify(jwt.encode(claims(), rsa_key, algorithm="RS256")) == "alice"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(AuthError):
        auth.verify(jwt.encode(claims(), other, algorithm="RS256"))
    with pytest.raises(AuthError):  # the public key used as an HMAC secret (alg confusion)
        auth.verify(hs256_by_hand(claims(), (tmp_path / "pub.pem").read_bytes()))
    with pytest.raises(AuthError):  # the same policy applies to every key
        auth.verify(jwt.encode(claims(exp=str(int(NOW) + 60)), rsa_key, algorithm="RS256"))
    assert not auth.can_mint
    with pytest.raises(ConfigError, match="only verifies"):
        auth.mint("alice")


def test_es256_from_a_jwks_file_picks_the_key_by_kid(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey
) -> None:
    ec_jwk = json.loads(ECAlgorithm.to_jwk(ec_key.public_key()))
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    jwks = {"keys": [{**ec_jwk, "kid": "ec-1"}, {**rsa_jwk, "kid": "rsa-1", "alg": "RS256"}]}
    (tmp_path / "jwks.json").write_text(json.dumps(jwks))
    auth = Authenticator(keys=load_public_keys(tmp_path / "jwks.json"))
    es = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    rs = jwt.encode(claims(sub="bob"), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    assert (auth.verify(es), auth.verify(rs)) == ("alice", "bob")
    for token in (
        jwt.encode(claims(), ec_key, algorithm="ES256"),  # no kid among two keys
        jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "rsa-1"}),
        jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "gone"}),
        "not.a.jwt",
    ):
        with pytest.raises(AuthError):
            auth.verify(token)


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(
            lambda k: k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            id="private-pem",
        ),
        pytest.param(
            lambda k: json.dumps({"keys": [json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(k))]}),
            id="private-jwk",
        ),
        pytest.param(lambda k: json.dumps({"kty": "oct", "k": "c2VjcmV0"}), id="symmetric-jwk"),
        pytest.param(lambda k: "hello", id="garbage"),
    ],
)
def test_key_files_that_are_refused(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, write: Callable[[Any], str | bytes]
) -> None:
    data = write(rsa_key)
    path = tmp_path / "key"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    with pytest.raises(ConfigError):
        load_public_keys(path)


def test_a_node_with_a_public_key_creates_no_secret_and_cannot_mint(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, capsys: pytest.CaptureFixture[str]
) -> None:
    key = pem(rsa_key, tmp_path / "pub.pem")
    db = f"sqlite:///{tmp_path}/chat.db"
    cfg = Config(db=db, jwt_public_key=str(key), jwt_issuer="accounts")
    auth = authenticator_for(cfg)
    token = jwt.encode(claims(iss="accounts"), rsa_key, algorithm="RS256")
    assert auth.verify(token) == "alice"
    assert not (tmp_path / "chat.db.secret").exists()
    assert main(["token", "alice", "--db", db, "--jwt-public-key", str(key)]) == 2
    assert "only verifies" in capsys.readouterr().err
    assert main(["token", "alice", "--jwt-secret", SECRET, "--jwt-public-key", str(key)]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_algorithms_must_fit_the_kind_of_key(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    keys = load_public_keys(pem(rsa_key, tmp_path / "pub.pem"))
    with pytest.raises(ConfigError):
        Authenticator(algorithms=("HS256",), keys=keys)
    with pytest.raises(ConfigError):
        Authenticator(SECRET, algorithms=("RS256",))
    with pytest.raises(ConfigError):
        Authenticator("")
