"""One typed Config, built from CLI flags and CHATD_* environment variables in one place.

Precedence: command-line flag > CHATD_<NAME> environment variable > default.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from protocol import Limits
from storage.urls import normalize_url, sqlite_path

from .errors import ConfigError

__all__ = ["OPTIONS", "Config", "Policy", "add_options", "config_from_args"]


@dataclass(frozen=True, slots=True)
class Policy:
    """The server's policy towards its clients: rates, connections, patience. (The wire
    limits a client relies on, sizes and page lengths, are `protocol.Limits`.)"""

    send_rate: float = 20.0
    """Sends per second per user (token bucket refill)."""
    send_burst: int = 100
    """Token bucket size for sends."""
    typing_rate: float = 5.0
    """Typing frames per second per user (burst of the same size)."""
    max_connections_per_user: int = 10
    """Connections of one user on one node at most (more: rate_limited, close 1013)."""
    hello_timeout: float = 10.0
    """Seconds a new connection has to send `hello`."""
    max_bad_frames: int = 10
    """The Nth `bad_frame` in a row is answered, then the connection closes 1008."""
    max_frame_rate: int = 1000
    """WebSocket messages per second one connection may send (averaged over runs of
    this many); faster: close 1008. Far above what any client needs (sends are 20/s)."""
    waste_rate: float = 10.0
    """Writes per second per user that store nothing and cost nothing: resent messages
    (duplicates) and marks on a conversation that is not the user's. Past the burst a
    duplicate costs a send token, and a mark is refused `rate_limited` before the writer."""
    waste_burst: int = 100
    """The burst of those (an honest client's retries after a reconnect fit in it)."""
    reads_per_user: int = 2
    """Reads (history, convs, duplicate lookups) of one user in flight at once on a node:
    one user cannot hold more than this share of the read pool."""
    replay_rate: int = 4 * 1024 * 1024
    """Bytes per second of stored events one user's catch-ups write (burst: 4 s of it):
    many `since=0` reconnects cost the attacker bandwidth, not everyone's latency."""


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8765
    db: str = "sqlite:///chatd.db"
    broker: str = "memory"
    """'memory' (one node) or a Redis URL, redis://HOST:PORT/DB (many nodes)."""
    broker_prefix: str = "chatd:"
    """Prefix of this fleet's Redis channels (several fleets may share one Redis)."""
    node_id: str = ""
    """This node's name in logs, metrics and the broker's envelopes (unset: host:pid)."""
    reorder_window_ms: float = 50.0
    """With the Redis broker: how long an event above a gap waits for the missing ones
    (two nodes may deliver out of order) before they are read from storage. (The
    in-process broker delivers in commit order: no window.)"""
    fleet_limits: bool = True
    """With the Redis broker: the send and typing rates and connections per user are
    counted across the fleet in Redis (unreachable: each node's own limits apply)."""
    workers: int = 1
    """Processes serving one port (SO_REUSEPORT), joined by the Redis broker."""
    reuse_port: bool = False
    """Listen with SO_REUSEPORT (set by --workers for each worker)."""
    position_interval: float = 5.0
    """With the Redis broker: seconds between two checks of every local user's stream
    position against storage (finds a lost last event; one query per 500 users)."""
    jwt_secret: str = ""
    jwt_secret_file: str = ""
    jwt_algorithms: tuple[str, ...] = ()
    """Accepted JWT algorithms (empty: HS256 with a secret, each public key's own)."""
    jwt_leeway: float = 0.0
    """Seconds a token is still accepted after its `exp` (clock skew of its issuer)."""
    jwt_public_key: str = ""
    """A PEM public key or JWKS file: the node verifies RS*/ES* tokens and mints none."""
    jwt_max_ttl: float = 7 * 86400.0
    """Longest token lifetime accepted (`exp - iat`, or `exp - now` without `iat`)."""
    jwt_issuer: str = ""
    """Required `iss` of every token (unset: not checked)."""
    jwt_audience: str = ""
    """Required `aud` of every token (unset: a token with an `aud` is refused)."""
    max_connections: int = 0
    """Connections this node holds at most (0: from its open-file limit, see admission)."""
    pending_share: float = 0.25
    """Share of max_connections for connections that have not said `hello` yet."""
    open_timeout: float = 5.0
    """Seconds a new TCP connection has to complete the WebSocket upgrade."""
    db_writers: int = 1
    """PostgreSQL: group commits in flight at once, each on a connection of its own. 1:
    since a batch's write checks its rows instead of holding them locked, a node's own
    writers conflict (most batches share people): with 2, 1,746-1,902 msg/s and a p99
    of 0.46-1.3 s against 1,937-1,958 and 94-243 ms at 2,000 msg/s, one node or two
    (loadtest/README.md, seventh sitting)."""
    group_commit: bool = True
    max_batch: int = 256
    commit_window_ms: float = 5.0
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    outbox_limit: int = 2000
    """Frames queued for one connection before it is closed 1013 as a slow reader."""
    outbox_bytes: int = 8 * 1024 * 1024
    """Bytes of frames queued for one connection before it is closed 1013 (the same)."""
    compression: bool = False
    migrate: bool = True
    shutdown_timeout: float = 10.0
    gc_young: int = 20_000
    """Allocations between young garbage collections (0: CPython's default of 700)."""
    log_level: str = "INFO"
    log_format: str = "plain"
    """'plain' lines, or 'json': one JSON object per line."""
    drain_grace: float = 0.0
    """Seconds /readyz answers 503 before the listener closes on SIGTERM (for the
    balancer to see it)."""
    limits: Limits = field(default_factory=Limits)
    policy: Policy = field(default_factory=Policy)

    @property
    def reorder_window(self) -> float:
        """Seconds an event above a gap waits (0 with the in-process broker)."""
        return 0.0 if self.broker == "memory" else self.reorder_window_ms / 1000.0

    @property
    def broker_shown(self) -> str:
        """`broker` as logs may show it: without a password."""
        parts = urlsplit(self.broker)
        if parts.password is None:
            return self.broker
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return urlunsplit(parts._replace(netloc=f"***@{host}{port}"))

    @property
    def node(self) -> str:
        """This node's name: `node_id`, else host:pid."""
        return self.node_id or f"{socket.gethostname()}:{os.getpid()}"

    @property
    def db_url(self) -> str:
        return normalize_url(self.db)

    def secret_path(self) -> Path:
        """Where the generated JWT secret lives: beside the SQLite file, else ./chatd.secret."""
        if self.jwt_secret_file:
            return Path(self.jwt_secret_file)
        db_file = sqlite_path(self.db_url)
        if db_file is not None:
            return db_file.with_name(db_file.name + ".secret")
        return Path("chatd.secret")


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def _algs(text: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in text.split(",") if a.strip())


@dataclass(frozen=True, slots=True)
class Option:
    name: str
    """Config field (or `limits.<field>`, `policy.<field>`)."""
    parse: Callable[[str], Any]
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def env(self) -> str:
        return "CHATD_" + self.field.upper()

    @property
    def group(self) -> str:
        """The sub-config it belongs to ("limits", "policy"), or "" for a top-level field."""
        return self.name.rpartition(".")[0]

    @property
    def field(self) -> str:
        return self.name.rpartition(".")[2]


OPTIONS: tuple[Option, ...] = (
    Option("host", str, "interface to listen on"),
    Option("port", int, "TCP port (0: any free port)"),
    Option("db", str, "database URL: sqlite:///FILE or postgresql://USER@HOST/DB"),
    Option("broker", str, "'memory' (one node) or redis://HOST:PORT/DB (many nodes)"),
    Option("broker_prefix", str, "prefix of this fleet's Redis channels"),
    Option("node_id", str, "this node's name in logs, metrics and envelopes (default host:pid)"),
    Option("fleet_limits", _bool, "rates and connections per user across the fleet (Redis)"),
    Option("workers", int, "processes on one port, joined by the Redis broker (needs redis)"),
    Option("reuse_port", _bool, "listen with SO_REUSEPORT (set by --workers)"),
    Option("reorder_window_ms", float, "ms an event above a gap waits before a fill (Redis)"),
    Option("position_interval", float, "seconds between position checks of every user (Redis)"),
    Option("jwt_secret", str, "HS256 secret (unset: a generated file beside the database)"),
    Option("jwt_secret_file", str, "file holding the JWT secret (created if missing)"),
    Option("jwt_algorithms", _algs, "accepted JWT algorithms, comma separated"),
    Option("jwt_leeway", float, "seconds a token stays valid after its exp (clock skew)"),
    Option("jwt_public_key", str, "PEM public key or JWKS file: verify RS256/ES256, mint none"),
    Option("jwt_max_ttl", float, "longest token lifetime in seconds (exp - iat)"),
    Option("jwt_issuer", str, "required iss claim (unset: not checked)"),
    Option("jwt_audience", str, "required aud claim (unset: tokens with an aud are refused)"),
    Option("max_connections", int, "connections held at most (0: from the open-file limit)"),
    Option("pending_share", float, "share of max_connections for those before hello"),
    Option("open_timeout", float, "seconds to complete the WebSocket upgrade"),
    Option("db_writers", int, "PostgreSQL: group commits in flight at once (connections)"),
    Option("group_commit", _bool, "batch concurrent writes into one transaction"),
    Option("max_batch", int, "most writes in one group commit"),
    Option("commit_window_ms", float, "ms between the starts of two group commits at least"),
    Option("ping_interval", float, "seconds between WebSocket pings"),
    Option("ping_timeout", float, "seconds to wait for a pong before closing"),
    Option("outbox_limit", int, "frames queued per connection before closing it 1013"),
    Option("outbox_bytes", int, "bytes of frames queued per connection before closing it 1013"),
    Option("compression", _bool, "offer permessage-deflate"),
    Option("migrate", _bool, "apply pending migrations at start"),
    Option("shutdown_timeout", float, "seconds to drain connections on shutdown"),
    Option("gc_young", int, "allocations between young GC passes (0: Python's 700)"),
    Option("log_level", str, "DEBUG, INFO, WARNING or ERROR"),
    Option("log_format", str, "'plain' lines or 'json' (one object per line)"),
    Option("drain_grace", float, "seconds /readyz answers 503 before the listener closes"),
    Option("limits.max_frame", int, "largest frame in bytes (above: close 1009)"),
    Option("limits.max_body", int, "largest message body in bytes"),
    Option("policy.send_rate", float, "sends per second per user"),
    Option("policy.send_burst", int, "send burst per user"),
    Option("policy.typing_rate", float, "typing frames per second per user"),
    Option("policy.max_connections_per_user", int, "connections per user"),
    Option("policy.hello_timeout", float, "seconds to send hello"),
    Option("policy.max_bad_frames", int, "bad frames in a row before close 1008"),
    Option("policy.max_frame_rate", int, "messages per second per connection (more: 1008)"),
    Option("policy.waste_rate", float, "duplicates and refused marks per second per user, free"),
    Option("policy.waste_burst", int, "burst of free duplicates and refused marks per user"),
    Option("policy.reads_per_user", int, "history/convs reads in flight per user at once"),
    Option("policy.replay_rate", int, "catch-up bytes per second per user (burst: 4 s)"),
    Option("limits.history_bytes", int, "message bytes in one history reply at most"),
)


def add_options(parser: argparse.ArgumentParser, names: set[str] | None = None) -> None:
    """Add a flag for each option (or only those named); defaults stay None (= unset)."""
    for opt in OPTIONS:
        if names is not None and opt.name not in names:
            continue
        parser.add_argument(
            opt.flag, dest=opt.name, type=opt.parse, default=None, help=f"{opt.help} [{opt.env}]"
        )


def config_from_args(ns: argparse.Namespace, env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    groups: dict[str, dict[str, Any]] = {"": {}, "limits": {}, "policy": {}}
    for opt in OPTIONS:
        value = getattr(ns, opt.name, None)
        if value is None and opt.env in env:
            try:
                value = opt.parse(env[opt.env])
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise ConfigError(f"{opt.env}: {exc}") from None
        if value is None:
            continue
        groups[opt.group][opt.field] = value
    cfg = Config(**groups[""])
    cfg = replace(
        cfg,
        limits=replace(cfg.limits, **groups["limits"]),
        policy=replace(cfg.policy, **groups["policy"]),
    )
    _check(cfg)
    return cfg


def _check(cfg: Config) -> None:
    _check_broker(cfg)
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"port {cfg.port} out of range")
    for sub in (cfg.limits, cfg.policy):
        for f in fields(sub):
            if getattr(sub, f.name) <= 0:
                raise ConfigError(f"limit {f.name} must be positive")
    _check_tokens(cfg)
    _check_budget(cfg)
    if cfg.outbox_limit < 1 or cfg.outbox_bytes < 1:
        raise ConfigError("outbox_limit and outbox_bytes must be positive")
    if cfg.log_format not in ("plain", "json"):
        raise ConfigError(f"log_format {cfg.log_format!r}: 'plain' or 'json'")
    if not 0.0 <= cfg.drain_grace <= 300.0:
        raise ConfigError("drain_grace must be between 0 and 300 seconds")
    if not 1 <= cfg.db_writers <= 16:
        raise ConfigError("db_writers must be between 1 and 16")
    if cfg.gc_young < 0:
        raise ConfigError("gc_young must be 0 or more")
    if not 0.0 <= cfg.commit_window_ms <= 100.0:
        raise ConfigError("commit_window_ms must be between 0 and 100")
    if cfg.limits.max_body >= cfg.limits.max_frame:
        raise ConfigError("max_body must be below max_frame")


def _check_broker(cfg: Config) -> None:
    if cfg.workers < 1:
        raise ConfigError("workers must be 1 or more")
    if cfg.workers > 1 and (cfg.broker == "memory" or sqlite_path(cfg.db_url) is not None):
        raise ConfigError(
            "--workers N > 1 runs N nodes, joined by the Redis broker on a shared database: "
            "use --broker redis://... with --db postgresql://..."
        )
    if cfg.broker == "memory":
        return
    if not cfg.broker.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"unknown broker {cfg.broker!r}: 'memory' or a redis:// URL")
    if sqlite_path(cfg.db_url) is not None:
        raise ConfigError(
            "the Redis broker joins several nodes, and a SQLite file belongs to one node: "
            "use --db postgresql://... with --broker redis://..."
        )
    if not 0.0 <= cfg.reorder_window_ms <= 5000.0:
        raise ConfigError("reorder_window_ms must be between 0 and 5000")
    if cfg.position_interval <= 0.0:
        raise ConfigError("position_interval must be positive")


def _check_tokens(cfg: Config) -> None:
    if not 0.0 <= cfg.jwt_leeway <= 300.0:
        raise ConfigError("jwt_leeway must be between 0 and 300 seconds")
    if not 60.0 <= cfg.jwt_max_ttl <= 366 * 86400.0:
        raise ConfigError("jwt_max_ttl must be between 60 seconds and 366 days")
    if cfg.jwt_public_key and (cfg.jwt_secret or cfg.jwt_secret_file):
        raise ConfigError(
            "jwt_public_key and a JWT secret exclude each other: a node verifies with "
            "either the account service's public keys or a shared secret"
        )


def _check_budget(cfg: Config) -> None:
    if cfg.max_connections < 0:
        raise ConfigError("max_connections must be 0 (from the open-file limit) or more")
    if not 0.0 < cfg.pending_share <= 1.0:
        raise ConfigError("pending_share must be above 0 and at most 1")
    if not 0.0 < cfg.open_timeout <= 60.0:
        raise ConfigError("open_timeout must be above 0 and at most 60 seconds")
