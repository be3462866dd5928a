"""`Context`: what every session of one node shares (its own module, so that the server,
the session and the handlers import it without importing each other)."""

from __future__ import annotations

from dataclasses import dataclass

from storage.base import Store

from .auth import Authenticator
from .broker import Broker
from .config import Config
from .hub import Hub
from .limits import FleetLimits
from .metrics import Metrics

__all__ = ["Context"]


@dataclass(slots=True)
class Context:
    config: Config
    store: Store
    broker: Broker
    hub: Hub
    auth: Authenticator
    metrics: Metrics
    limits: FleetLimits
