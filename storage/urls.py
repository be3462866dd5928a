"""Database URL normalisation: what the user types → what SQLAlchemy async needs."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import make_url

__all__ = [
    "asyncpg_dsn",
    "is_postgres",
    "is_sqlite",
    "normalize_url",
    "pg_statement_cache_size",
    "sqlite_path",
]

_SQLITE_PREFIXES = ("sqlite+aiosqlite://", "sqlite+pysqlite://", "sqlite://")
_PG_PREFIXES = (
    "postgresql+asyncpg://",
    "postgresql+psycopg2://",
    "postgresql+psycopg://",
    "postgresql://",
    "postgres://",
)


def normalize_url(url: str) -> str:
    """The async SQLAlchemy URL for `url`.

    - `sqlite:///path.db`, `sqlite+aiosqlite:///path.db`, or a bare path
      (`chatd.db`, `/var/lib/chatd/chatd.db`) → `sqlite+aiosqlite:///path.db`;
    - `postgres://`, `postgresql://`, `postgresql+asyncpg://` → `postgresql+asyncpg://`.

    Raises ValueError for anything else (and for in-memory SQLite, which the
    store cannot share between its connections).
    """
    url = url.strip()
    for prefix in _SQLITE_PREFIXES:
        if url.startswith(prefix):
            rest = url[len(prefix) :]
            if rest in ("", "/", "/:memory:") or ":memory:" in rest or "mode=memory" in rest:
                raise ValueError("in-memory SQLite is not supported: give a file path")
            return "sqlite+aiosqlite://" + rest
    for prefix in _PG_PREFIXES:
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    if "://" not in url and url and url != ":memory:":
        return "sqlite+aiosqlite:///" + url
    raise ValueError(f"unsupported database URL: {url.split('://', 1)[0]}://...")


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (or bare path), None for other databases."""
    norm = normalize_url(url)
    if not norm.startswith("sqlite+aiosqlite:///"):
        return None
    rest = norm[len("sqlite+aiosqlite:///") :]
    rest = rest.split("?", 1)[0]
    return Path(rest)


def is_sqlite(url: str) -> bool:
    return normalize_url(url).startswith("sqlite")


def is_postgres(url: str) -> bool:
    return normalize_url(url).startswith("postgresql")


STATEMENT_CACHE_OPTION = "statement_cache_size"
"""A PostgreSQL URL's query option (asyncpg's own name): `?statement_cache_size=0` behind
PgBouncer in transaction pooling mode (no named prepared statement outlives its
transaction); chatd takes it off the URL and configures its writer and readers."""


def pg_statement_cache_size(url: str) -> tuple[str, int | None]:
    """`url` (normalized) without the `statement_cache_size` option, and its value (None:
    not given, or not PostgreSQL)."""
    norm = normalize_url(url)
    if not norm.startswith("postgresql"):
        return norm, None
    u = make_url(norm)
    raw = u.query.get(STATEMENT_CACHE_OPTION)
    if raw is None:
        return u.render_as_string(hide_password=False), None
    value = raw[-1] if isinstance(raw, tuple) else raw
    if not value.isdigit():
        raise ValueError(f"{STATEMENT_CACHE_OPTION} must be a number, not {value!r}")
    u = u.difference_update_query([STATEMENT_CACHE_OPTION])
    return u.render_as_string(hide_password=False), int(value)


def asyncpg_dsn(url: str) -> str:
    """The DSN that `asyncpg.connect` takes for a PostgreSQL URL (no `+driver`)."""
    return (
        make_url(normalize_url(url))
        .set(drivername="postgresql")
        .render_as_string(hide_password=False)
    )
