"""Which exceptions mean "the database is unavailable" (wrapped as StorageUnavailable), and
which mean "the database refused a value" (one write's fault: StorageRejected)."""

from __future__ import annotations

import sqlite3

import asyncpg
from sqlalchemy.exc import SQLAlchemyError

__all__ = ["RETRYABLE_SQLSTATES", "is_data_error", "is_driver_error", "sqlstate"]

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


#: SQLSTATE classes of a refused value (22: data exception, 23: integrity constraint).
_DATA_SQLSTATE_CLASSES = ("22", "23")

#: Python-side refusals of a value by a driver (sqlite3: an int over 64 bits is an
#: OverflowError; asyncpg's client-side DataError is a ValueError).
_DATA_ERRORS: tuple[type[BaseException], ...] = (
    OverflowError,
    TypeError,
    ValueError,
    sqlite3.DataError,
    sqlite3.IntegrityError,
)


def is_data_error(exc: BaseException) -> bool:
    """True when `exc` is the database (or its driver) refusing a value of the
    transaction, not the database being unavailable: the same writes fail again
    whenever they are retried, and the other writes of their transaction would not."""
    code = sqlstate(exc)
    if code is not None:
        return code[:2] in _DATA_SQLSTATE_CLASSES and code not in RETRYABLE_SQLSTATES
    return any(isinstance(e, _DATA_ERRORS) for e in _chain(exc))


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and what it wraps (SQLAlchemy's `orig`, then `__cause__`), each once."""
    out: list[BaseException] = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        out.append(cur)
        orig = getattr(cur, "orig", None)
        cur = orig if isinstance(orig, BaseException) else cur.__cause__
    return out


def sqlstate(exc: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE behind `exc`, if any."""
    for cur in _chain(exc):
        for attr in ("sqlstate", "pgcode"):
            code = getattr(cur, attr, None)
            if isinstance(code, str):
                return code
    return None
