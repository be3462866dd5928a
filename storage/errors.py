"""Which exceptions mean "the database is unavailable" (wrapped as StorageUnavailable)."""

from __future__ import annotations

import sqlite3

import asyncpg
from sqlalchemy.exc import SQLAlchemyError

__all__ = ["RETRYABLE_SQLSTATES", "is_driver_error", "sqlstate"]

#: deadlock_detected, serialization_failure, unique_violation (a race lost to another node).
RETRYABLE_SQLSTATES = frozenset({"40P01", "40001", "23505"})

_DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    SQLAlchemyError,
    OSError,  # ConnectionRefusedError, ConnectionResetError, ...
    TimeoutError,
    sqlite3.Error,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


def is_driver_error(exc: BaseException) -> bool:
    """True for errors of the database, its driver or the connection to it."""
    return isinstance(exc, _DRIVER_ERRORS)


def sqlstate(exc: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE behind `exc`, if any."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        for attr in ("sqlstate", "pgcode"):
            code = getattr(cur, attr, None)
            if isinstance(code, str):
                return code
        orig = getattr(cur, "orig", None)
        cur = orig if isinstance(orig, BaseException) else cur.__cause__
    return None
