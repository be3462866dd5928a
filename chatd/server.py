"""The chatd process: startup, main loop and shutdown as plain methods."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence
from http import HTTPStatus
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from protocol import SUBPROTOCOL
from storage.base import StorageError, Store

from .admission import Admission, budget_for
from .auth import Authenticator, TokenPolicy, load_or_create_secret, load_public_keys
from .broker import Broker, BrokerUnavailable, LiveEvent
from .config import Config
from .connection import ChatConnection, connection_class
from .context import Context
from .errors import ConfigError
from .hub import Hub
from .limits import SPREAD, FleetLimits, NodeOnly
from .metrics import Metrics
from .positions import Positions
from .session import Session

log = logging.getLogger("chatd.server")

__all__ = ["Server", "authenticator_for", "build_broker", "build_limits", "build_store"]

_BACKLOG = 4096
"""The listen backlog (asyncio's default is 100): a reconnect storm after a node restart
overflowed it, and each dropped SYN waits 1 s, then 3 s, for its retransmission
(loadtest/conns.py: p99 4.6 s with 256 connects in flight). The kernel caps it at
net.core.somaxconn."""


def authenticator_for(config: Config) -> Authenticator:
    """Verifies with the account service's public keys when given (and creates no secret),
    else with the shared secret (generated into a file when none is set)."""
    policy = TokenPolicy(
        leeway=config.jwt_leeway,
        max_ttl=config.jwt_max_ttl,
        issuer=config.jwt_issuer,
        audience=config.jwt_audience,
    )
    if config.jwt_public_key:
        keys = load_public_keys(Path(config.jwt_public_key))
        return Authenticator(algorithms=config.jwt_algorithms, keys=keys, policy=policy)
    secret = config.jwt_secret or load_or_create_secret(config.secret_path())
    return Authenticator(secret, config.jwt_algorithms, policy=policy)


def build_store(config: Config) -> Store:
    from storage.sql import SqlStore

    return SqlStore(
        config.db_url,
        group_commit=config.group_commit,
        max_batch=config.max_batch,
        commit_window=config.commit_window_ms / 1000.0,
        writers=config.db_writers,
    )


def build_broker(config: Config) -> Broker:
    if config.broker == "memory":
        from .broker_memory import LocalBroker

        return LocalBroker()
    if config.broker.startswith(("redis://", "rediss://", "unix://")):
        from .broker_redis import RedisBroker

        return RedisBroker(config.broker, prefix=config.broker_prefix, node_id=config.node)
    raise ConfigError(f"unknown broker {config.broker!r}: 'memory' or a redis:// URL")


def build_limits(config: Config) -> FleetLimits:
    """Fleet-wide limits in the fleet's Redis, unless one node or --fleet-limits false."""
    if config.broker == "memory" or not config.fleet_limits:
        return NodeOnly()
    from .limits_redis import RedisLimits

    return RedisLimits(
        config.broker, config.policy, prefix=config.broker_prefix, node_id=config.node
    )


class Server:
    def __init__(
        self,
        config: Config,
        *,
        store: Store | None = None,
        broker: Broker | None = None,
    ) -> None:
        self.config = config
        self.draining = False
        self.metrics = Metrics(config.node_id)  # a `node` label when --node-id is set
        self.store = store if store is not None else build_store(config)
        self.broker = broker if broker is not None else build_broker(config)
        self.limits = build_limits(config)
        self.hub = Hub(self.broker, config.policy, self.limits)
        local = config.broker == "memory" and broker is None
        self.positions = Positions(
            self.hub, self.store, None if local else config.position_interval
        )
        self.metrics.watch_store(self.store)
        self.metrics.watch_broker(self.broker)
        self.metrics.watch_limits(self.limits)
        self._sessions: set[Session] = set()
        self.metrics.watch_hub(self.hub, self._outbox_depth, config.outbox_limit)
        self._lag_hook = _hook_lag(self.broker, self.metrics)
        self.metrics.draining.set_function(lambda: float(self.draining))
        self.admission = _admission(config, self.metrics)
        self.ctx = Context(
            config,
            self.store,
            self.broker,
            self.hub,
            authenticator_for(config),
            self.metrics,
            self.limits,
        )
        self._ws: WsServer | None = None
        self._ids = itertools.count(1)
        self._stopped = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        cfg = self.config
        from storage.migrate import check_schema_async, upgrade_async

        if cfg.migrate:
            await upgrade_async(cfg.db_url)  # at the head after it, or it raises
        else:  # refuse a missing or older schema rather than limp
            newer = await check_schema_async(cfg.db_url)
            if newer is not None:
                log.warning(
                    "the database schema is at revision %s, newer than this chatd knows: "
                    "running on it as --migrate false asks (a rolling upgrade)",
                    newer,
                )
        await self.store.open()
        deliver = self.hub.deliver if self._lag_hook else self._deliver_timed
        await self.broker.start(deliver, self._resync)
        await self.limits.start(self._announce_spread)
        self.positions.start()
        self._ws = await serve(
            self._handle,
            cfg.host,
            cfg.port,
            subprotocols=[Subprotocol(SUBPROTOCOL)],
            select_subprotocol=_select_subprotocol,
            process_request=self._process_request,
            compression="deflate" if cfg.compression else None,
            max_size=cfg.limits.max_frame,
            ping_interval=cfg.ping_interval,
            ping_timeout=cfg.ping_timeout,
            close_timeout=5,
            server_header="chatd",
            backlog=_BACKLOG,
            open_timeout=cfg.open_timeout,
            reuse_port=cfg.reuse_port,
            create_connection=connection_class(self.admission),
        )
        where = (cfg.host, self.port, cfg.broker_shown, cfg.node)
        log.info("listening on ws://%s:%d/ws (broker %s, node %s)", *where)
        budget = self.admission.budget
        log.info(
            "connection budget: %d connections (%s), %d of them before hello",
            budget.limit,
            f"open-file limit {budget.nofile}" if budget.nofile else "--max-connections",
            budget.pending,
        )

    @property
    def port(self) -> int:
        assert self._ws is not None
        for sock in self._ws.sockets:
            return int(sock.getsockname()[1])
        raise RuntimeError("not listening")

    async def wait(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        """Drain: /readyz turns 503 (for `drain_grace` seconds the listener stays open,
        refusing new sessions), stop listening, let the writes in flight commit and their
        `sent` go out, close connections with 1001, then close broker and store."""
        self.draining = True
        ws, self._ws = self._ws, None
        if ws is not None:
            if self.config.drain_grace > 0:
                log.info("draining: /readyz is 503 for %.1f s", self.config.drain_grace)
                await asyncio.sleep(self.config.drain_grace)
            ws.server.close()  # accept no more connections
            log.info("shutting down: draining %d sessions", len(self._sessions))
            try:
                async with asyncio.timeout(self.config.shutdown_timeout):
                    await asyncio.gather(*(s.drain() for s in tuple(self._sessions)))
            except TimeoutError:
                log.warning("sessions did not drain in time")
            ws.close(close_connections=True)
            try:
                async with asyncio.timeout(self.config.shutdown_timeout):
                    await ws.wait_closed()
            except TimeoutError:
                log.warning("connections did not close in time")
        await self.positions.close()
        await self.limits.close()
        await self.broker.close()
        await self.store.close()
        self._stopped.set()
        log.info("stopped")

    def _resync(self) -> None:
        """The broker may have lost events: positions are checked, and SPREAD notices
        may be among the lost (every user is checked in the fleet again)."""
        self.positions.resync()
        self.limits.spread()

    def _announce_spread(self, user: str) -> None:
        self.broker.publish([(user, SPREAD)])

    async def __aenter__(self) -> Server:
        try:
            await self.start()
        except BaseException:
            await self.stop()  # what did start (the store, the broker) is closed again
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ connections

    async def _handle(self, ws: ServerConnection) -> None:
        conn_id = next(self._ids)
        log.debug("conn %d: open from %s", conn_id, ws.remote_address)
        assert isinstance(ws, ChatConnection)
        ws.conn_id = conn_id
        session = Session(self.ctx, ws, conn_id)
        self._sessions.add(session)
        try:
            await session.run()
        finally:
            self._sessions.discard(session)

    def _deliver_timed(self, user: str, event: LiveEvent) -> None:
        """The in-process broker's deliver: timed from the publish's stamp."""
        self.hub.deliver(user, event)
        self.metrics.on_lag(time.time() - self.metrics.published_at)

    def _outbox_depth(self) -> tuple[int, int]:
        """Frames queued for all sessions, and for the fullest one (read at scrape time)."""
        depths = [s.out.queued for s in self._sessions]
        return sum(depths), max(depths, default=0)

    async def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/ws":
            if self.draining:
                return ws.respond(HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
            return None
        if path == "/healthz":
            return ws.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            if self.draining:
                return ws.respond(HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
            try:
                await self.store.ping()
            except StorageError:
                return ws.respond(HTTPStatus.SERVICE_UNAVAILABLE, "storage unavailable\n")
            try:
                await self.broker.ping()
            except BrokerUnavailable:
                # Still ready: sends are stored and acknowledged, and sessions find what
                # they miss from storage (positions). Failing here would take every node
                # of a fleet out of its balancer at once when Redis blinks.
                return ws.respond(
                    HTTPStatus.OK, "ready (broker unavailable: live delivery degraded)\n"
                )
            return ws.respond(HTTPStatus.OK, "ready\n")
        if path == "/metrics":
            resp = ws.respond(HTTPStatus.OK, generate_latest(self.metrics.registry).decode())
            resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
            return resp
        return ws.respond(HTTPStatus.NOT_FOUND, "not found: connect to /ws\n")


def _hook_lag(broker: Broker, metrics: Metrics) -> bool:
    """Time deliveries by the Redis envelope's publish time (`on_lag`); False for a
    broker without one (the server stamps at publish then)."""
    from .broker_redis import RedisBroker

    if isinstance(broker, RedisBroker):
        broker.on_lag = metrics.on_lag
        return True
    return False


def _admission(config: Config, metrics: Metrics) -> Admission:
    """The connection budget, its numbers exported at scrape time."""
    adm = Admission(
        budget_for(config.max_connections, config.pending_share),
        on_shed=lambda stage: metrics.shed.labels(stage).inc(),
    )
    for stage in ("upgrade", "hello"):
        metrics.shed.labels(stage)  # exported at 0 from the start
    metrics.budget.labels("all").set(adm.budget.limit)
    metrics.budget.labels("pending").set(adm.budget.pending)
    metrics.open_sockets.set_function(lambda: adm.open)
    metrics.pending.set_function(lambda: adm.pending)
    return adm


def _select_subprotocol(ws: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """Select chatd.v1 when offered; a client that offers none is served all the same."""
    return Subprotocol(SUBPROTOCOL) if SUBPROTOCOL in offered else None
