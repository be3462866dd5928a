"""Database URL normalisation: what the user types → what SQLAlchemy async needs."""

from __future__ import annotations

from pathlib import Path

__all__ = ["is_postgres", "is_sqlite", "normalize_url", "sqlite_path"]

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
