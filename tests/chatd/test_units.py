"""Unit tests of chatd's small parts: broker contract, hub, rate limits, config, auth."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest

from chatd.admission import Budget, budget_for
from chatd.auth import Authenticator, load_or_create_secret
from chatd.broker import Broker, LiveEvent
from chatd.broker_memory import LocalBroker
from chatd.config import Config, Policy, add_options, config_from_args
from chatd.errors import AuthError, ConfigError
from chatd.hub import Hub, TooManyConnections
from chatd.ratelimit import TokenBucket
from protocol import Limits

SECRET = "k" * 64  # long enough for HS512 too (the alg-not-allowed case signs with it)

# ----------------------------------------------------------------- broker contract

BROKERS: dict[str, Callable[[], Broker]] = {"memory": LocalBroker}


@pytest.fixture(params=sorted(BROKERS))
async def broker(request: pytest.FixtureRequest) -> Broker:
    return BROKERS[request.param]()


async def test_broker_delivers_in_order_to_subscribed_users_only(broker: Broker) -> None:
    got: list[tuple[str, LiveEvent]] = []
    await broker.start(lambda user, ev: got.append((user, ev)))
    await broker.subscribe("alice")
    events = [("alice", LiveEvent(i, b"a%d" % i)) for i in range(1, 6)]
    broker.publish([*events, ("bob", LiveEvent(1, b"b1"))])
    assert got == events
    await broker.close()


async def test_broker_unsubscribe_stops_delivery_and_is_idempotent(broker: Broker) -> None:
    got: list[str] = []
    await broker.start(lambda user, ev: got.append(user))
    await broker.subscribe("alice")
    await broker.subscribe("alice")
    await broker.unsubscribe("alice")
    await broker.unsubscribe("alice")
    broker.publish([("alice", LiveEvent(1, b"x"))])
    assert got == []
    await broker.close()


# ----------------------------------------------------------------- hub


class _FakeSession:
    def __init__(self, user: str) -> None:
        self.user = user
        self.got: list[LiveEvent] = []

    def push_live(self, event: LiveEvent) -> None:
        self.got.append(event)


async def test_hub_routes_to_every_session_of_the_user_and_enforces_the_limit() -> None:
    broker = LocalBroker()
    hub = Hub(broker, Policy(max_connections_per_user=2))
    await broker.start(hub.deliver)
    a1, a2, a3, b = (_FakeSession(u) for u in ("alice", "alice", "alice", "bob"))
    await hub.attach(a1)  # type: ignore[arg-type]
    await hub.attach(a2)  # type: ignore[arg-type]
    with pytest.raises(TooManyConnections):
        await hub.attach(a3)  # type: ignore[arg-type]
    await hub.attach(b)  # type: ignore[arg-type]
    ev = LiveEvent(7, b"frame")
    broker.publish([("alice", ev)])
    assert a1.got == [ev] and a2.got == [ev] and b.got == [] and a3.got == []
    await hub.detach(a1)  # type: ignore[arg-type]
    await hub.detach(a2)  # type: ignore[arg-type]
    broker.publish([("alice", LiveEvent(8, b"later"))])
    assert a1.got == [ev]
    assert hub.session_count() == 1


# ----------------------------------------------------------------- token bucket


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = bucket.take(0.0)
    assert wait == pytest.approx(0.1)
    assert bucket.take(0.05) == pytest.approx(0.05)
    assert bucket.take(0.2) == 0.0  # refilled at 10/s
    assert bucket.take(100.0) == 0.0  # capped at the burst, not 1000 tokens
    assert [bucket.take(100.0) for _ in range(3)].count(0.0) == 2
    assert bucket.take(100.0) > 0.0
    bucket.refund()
    assert bucket.take(100.0) == 0.0
    bucket.refund()
    bucket.refund()
    bucket.refund()
    bucket.refund()
    assert [bucket.take(100.0) for _ in range(4)].count(0.0) == 3  # never above the burst


# ----------------------------------------------------------------- config


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_options(p)
    return p.parse_args(argv)


def test_config_flag_beats_env_beats_default() -> None:
    env = {"CHATD_PORT": "9000", "CHATD_HOST": "0.0.0.0", "CHATD_SEND_RATE": "2.5"}
    cfg = config_from_args(_parse(["--port", "9100"]), env)
    assert cfg.port == 9100
    assert cfg.host == "0.0.0.0"
    assert cfg.policy.send_rate == 2.5
    assert cfg.limits.max_body == Limits().max_body
    assert config_from_args(_parse([]), {}) == Config()


@pytest.mark.parametrize(
    "env",
    [
        {"CHATD_BROKER": "zeromq"},
        {"CHATD_PORT": "70000"},
        {"CHATD_PORT": "eighty"},
        {"CHATD_GROUP_COMMIT": "perhaps"},
        {"CHATD_MAX_BODY": "0"},
        {"CHATD_MAX_BODY": "70000"},
        {"CHATD_JWT_LEEWAY": "-1"},
        {"CHATD_JWT_LEEWAY": "301"},
        {"CHATD_JWT_MAX_TTL": "10"},
        {"CHATD_JWT_MAX_TTL": "1e9"},
        {"CHATD_JWT_PUBLIC_KEY": "pub.pem", "CHATD_JWT_SECRET": "s" * 32},
        {"CHATD_MAX_CONNECTIONS": "-1"},
        {"CHATD_PENDING_SHARE": "0"},
        {"CHATD_PENDING_SHARE": "1.5"},
        {"CHATD_OPEN_TIMEOUT": "0"},
    ],
)
def test_config_refuses_bad_values(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        config_from_args(_parse([]), env)


def test_connection_budget_comes_from_the_open_file_limit_unless_set() -> None:
    assert budget_for(0, 0.25, nofile=1024) == Budget(896, 224, 1024)
    assert budget_for(0, 0.25, nofile=20_000) == Budget(17_500, 4_375, 20_000)
    assert budget_for(60, 0.25) == Budget(60, 15, 0)
    assert budget_for(3, 0.1) == Budget(3, 1, 0)  # at least one may say hello
    cfg = config_from_args(_parse(["--max-connections", "60"]), {"CHATD_PENDING_SHARE": "0.5"})
    assert (cfg.max_connections, cfg.pending_share, cfg.open_timeout) == (60, 0.5, 5.0)


def test_secret_file_sits_beside_the_sqlite_file(tmp_path: Path) -> None:
    cfg = Config(db=f"sqlite:///{tmp_path}/data/chat.db")
    assert cfg.secret_path() == tmp_path / "data" / "chat.db.secret"
    assert Config(db="postgresql://u@h/db").secret_path() == Path("chatd.secret")


def test_generated_secret_is_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "s" / "chatd.secret"
    first = load_or_create_secret(path)
    assert len(first) >= 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_secret(path) == first


# ----------------------------------------------------------------- auth


def _b64(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def test_auth_accepts_its_own_tokens() -> None:
    auth = Authenticator(SECRET)
    assert auth.verify(auth.mint("alice.b-1_2")) == "alice.b-1_2"


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: Authenticator("other" * 8).mint("alice"), id="other-secret"),
        pytest.param(
            lambda: Authenticator(SECRET).mint("alice", ttl=60, now=time.time() - 3600),
            id="expired",
        ),
        pytest.param(
            lambda: (
                f"{_b64({'alg': 'none', 'typ': 'JWT'})}."
                f"{_b64({'sub': 'alice', 'exp': int(time.time()) + 60})}."
            ),
            id="alg-none",
        ),
        pytest.param(lambda: jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"), id="no-exp"),
        pytest.param(
            lambda: jwt.encode(
                {"sub": "al ice", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"
            ),
            id="bad-sub",
        ),
        pytest.param(
            lambda: jwt.encode(
                {"sub": "alice", "exp": int(time.time()) + 60}, SECRET, algorithm="HS512"
            ),
            id="alg-not-allowed",
        ),
        pytest.param(lambda: "not.a.jwt", id="garbage"),
    ],
)
def test_auth_refuses(make: Callable[[], str]) -> None:
    with pytest.raises(AuthError):
        Authenticator(SECRET).verify(make())


def test_auth_leeway_is_the_configured_clock_skew_and_none_by_default() -> None:
    token = Authenticator(SECRET).mint("alice", ttl=1, now=time.time() - 4)  # 3 s expired
    with pytest.raises(AuthError):
        Authenticator(SECRET).verify(token)
    cfg = config_from_args(_parse([]), {"CHATD_JWT_LEEWAY": "10"})
    assert cfg.jwt_leeway == 10.0
    assert Authenticator(SECRET, leeway=cfg.jwt_leeway).verify(token) == "alice"


def test_auth_never_allows_alg_none_in_config() -> None:
    with pytest.raises(ConfigError):
        Authenticator(SECRET, algorithms=("HS256", "none"))


async def test_hub_keeps_a_users_rate_limits_across_reconnects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Closing the last connection must not refill the send bucket; only time does."""
    clock = [1000.0]
    monkeypatch.setattr("chatd.hub.time.monotonic", lambda: clock[0])
    hub = Hub(LocalBroker(), Policy(send_burst=2, send_rate=1.0))
    first = _FakeSession("alice")
    state = await hub.attach(first)  # type: ignore[arg-type]
    assert state.sends.take(clock[0]) == 0.0
    assert state.sends.take(clock[0]) == 0.0
    await hub.detach(first)  # type: ignore[arg-type]
    again = await hub.attach(_FakeSession("alice"))  # type: ignore[arg-type]
    assert again.sends.take(clock[0]) > 0.0  # still empty: reconnecting reset nothing
    await hub.detach(_FakeSession("alice"))  # type: ignore[arg-type]  # not attached: no-op
    for s in list(again.sessions):
        await hub.detach(s)
    # Once the bucket would be full anyway, the resting state is forgotten (bounded memory).
    clock[0] += 10.0
    await hub.attach(_FakeSession("bob"))  # type: ignore[arg-type]
    for s in list(hub.sessions()):
        await hub.detach(s)
    assert "alice" not in hub._resting
    fresh = await hub.attach(_FakeSession("alice"))  # type: ignore[arg-type]
    assert fresh is not again and fresh.sends.take(clock[0]) == 0.0


async def test_metrics_export_the_group_commit_batch_sizes(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    from chatd.metrics import Metrics
    from storage.migrate import upgrade_async
    from storage.sql import SqlStore
    from storage.urls import normalize_url

    url = normalize_url(str(tmp_path / "m.db"))
    await upgrade_async(url)
    store = SqlStore(url, commit_window=0.2)
    metrics = Metrics()
    metrics.watch_store(store)
    await store.open()
    try:
        await store.send("alice", "bob", "c0", "hi", "text", 1)  # idle writer: alone
        # three sends inside the window share one transaction
        await asyncio.gather(
            *(store.send("alice", "bob", f"c{i}", "hi", "text", 1) for i in (1, 2, 3))
        )
    finally:
        await store.close()
    text = generate_latest(metrics.registry).decode()
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("chatd_storage_batch")
    }
    assert samples['chatd_storage_batch_ops_bucket{le="1"}'] == 1
    assert samples['chatd_storage_batch_ops_bucket{le="2"}'] == 1
    assert samples['chatd_storage_batch_ops_bucket{le="4"}'] == 2
    assert samples['chatd_storage_batch_ops_bucket{le="+Inf"}'] == 2
    assert samples["chatd_storage_batch_ops_count"] == 2
    assert samples["chatd_storage_batch_ops_sum"] == 4
    assert samples["chatd_storage_batches_total"] == 2
    assert samples["chatd_storage_batched_ops_total"] == 4


def test_default_policy_matches_the_contract() -> None:
    pol = Policy()
    assert (pol.send_rate, pol.send_burst) == (20.0, 100)
    assert pol.typing_rate == 5.0
    assert pol.max_connections_per_user == 10
    assert pol.hello_timeout == 10.0
    assert pol.max_bad_frames == 10


def test_a_bucket_paces_work_by_its_size() -> None:
    bucket = TokenBucket(rate=100.0, burst=400.0, now=0.0)
    assert bucket.wait(0.0) == 0.0
    assert bucket.spend(300.0, 0.0) == 0.0  # within the burst: no wait
    assert bucket.spend(300.0, 0.0) == pytest.approx(2.0)  # 200 in debt at 100/s
    assert bucket.wait(1.0) > 0.0  # still 100 in debt after 1 s
    assert bucket.wait(3.01) == 0.0  # paid back, and a token more
    assert bucket.take(3.01) == 0.0


def test_the_redis_broker_needs_a_shared_database_and_hides_its_password() -> None:
    with pytest.raises(ConfigError, match="SQLite file belongs to one node"):
        config_from_args(_parse([]), {"CHATD_BROKER": "redis://127.0.0.1:6379/0"})
    with pytest.raises(ConfigError, match="unknown broker"):
        config_from_args(_parse([]), {"CHATD_BROKER": "kafka://x"})
    cfg = config_from_args(
        _parse([]),
        {"CHATD_BROKER": "redis://:s3cret@10.0.0.1:6379/0", "CHATD_DB": "postgresql://h/db"},
    )
    assert "s3cret" not in cfg.broker_shown and cfg.broker_shown.endswith("10.0.0.1:6379/0")
    assert cfg.reorder_window == 0.05
    assert config_from_args(_parse([]), {}).reorder_window == 0.0  # one node: in commit order


def test_workers_need_the_redis_broker_and_a_shared_database() -> None:
    with pytest.raises(ConfigError, match="--workers N > 1"):
        config_from_args(_parse(["--workers", "2"]), {})
    with pytest.raises(ConfigError, match="--workers N > 1"):
        config_from_args(_parse(["--workers", "2", "--db", "postgresql://h/db"]), {})
    cfg = config_from_args(
        _parse(["--workers", "2", "--db", "postgresql://h/db", "--broker", "redis://h:6379/0"]),
        {},
    )
    assert cfg.workers == 2
