"""Schema migrations (Alembic), configured in code so they work from an installed package.

`upgrade(url)` (sync, for a CLI) and `upgrade_async(url)` bring the database to
the newest revision; running them again is a no-op. On PostgreSQL the upgrade
holds a session advisory lock, so several nodes starting at once migrate one
after the other (the later ones find nothing to do). On SQLite the database
file's own lock serialises writers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from storage.base import StorageError, StorageUnavailable
from storage.errors import is_driver_error
from storage.urls import normalize_url, sqlite_path

__all__ = [
    "MIGRATIONS_DIR",
    "PG_MIGRATION_LOCK",
    "SchemaMismatch",
    "check_schema_async",
    "current_revision",
    "current_revision_async",
    "head_revision",
    "upgrade",
    "upgrade_async",
]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

#: Key of the PostgreSQL advisory lock held while migrating ("chatd" + 1).
PG_MIGRATION_LOCK = 0x636861_7464_0001


def alembic_config(url: str | None = None) -> Config:
    """An Alembic Config pointing at this package's migrations."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The newest revision of the migrations shipped with this package."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships revisions
        raise RuntimeError("no migrations found")
    return head


class SchemaMismatch(StorageError):
    """The database's schema is not the one this chatd needs (not migrated, older, or
    migrated by a newer chatd)."""


def _known_revisions() -> set[str]:
    return {r.revision for r in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


def _mismatch(current: str | None) -> SchemaMismatch:
    head = head_revision()
    if current is None:
        return SchemaMismatch(
            f"the database has no chatd schema (this chatd needs revision {head}): "
            "run `chatd migrate`, or serve without `--migrate false`"
        )
    if current in _known_revisions():
        return SchemaMismatch(
            f"the database schema is at revision {current}, this chatd needs {head}: "
            "run `chatd migrate`"
        )
    return SchemaMismatch(
        f"the database schema is at revision {current}, which this chatd does not know "
        f"(its newest is {head}): was it migrated by a newer chatd? Run that version"
    )


async def check_schema_async(url: str) -> str | None:
    """For a node that does not migrate: None when the database at `url` is at this
    package's head revision; a revision this package does not know (a newer chatd
    migrated it: a rolling upgrade migrates first, then restarts the old nodes on it);
    else SchemaMismatch (missing or older). StorageUnavailable when unreachable."""
    current = await current_revision_async(url)
    if current == head_revision():
        return None
    if current is not None and current not in _known_revisions():
        return current
    raise _mismatch(current)


def _upgrade_sync(connection: Connection, url: str) -> None:
    cfg = alembic_config(url)
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


def _current_sync(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def _with_lock(conn: AsyncConnection, url: str) -> None:
    pg = conn.dialect.name == "postgresql"
    if pg:
        await conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": PG_MIGRATION_LOCK})
        await conn.commit()
    try:
        await conn.run_sync(_upgrade_sync, url)
        await conn.commit()
    finally:
        if pg:
            await conn.rollback()
            await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_MIGRATION_LOCK})
            await conn.commit()


async def upgrade_async(url: str) -> None:
    """Migrate the database at `url` to the newest revision (idempotent).

    Raises StorageUnavailable when the database cannot be reached.
    """
    norm = normalize_url(url)
    path = sqlite_path(norm)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        async with _connected(norm, "migration failed") as conn:
            await _with_lock(conn, norm)
    except CommandError as exc:  # e.g. a revision unknown here: a newer chatd's schema
        current = await current_revision_async(norm)
        raise _mismatch(current) from exc


async def current_revision_async(url: str) -> str | None:
    """The revision the database at `url` is at (None when never migrated)."""
    async with _connected(normalize_url(url), "cannot read revision") as conn:
        return await conn.run_sync(_current_sync)


@contextlib.asynccontextmanager
async def _connected(url: str, failure: str) -> AsyncIterator[AsyncConnection]:
    """A connection on a one-off engine (disposed after); a driver error is raised as
    StorageUnavailable("<failure>: <error type>")."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            yield conn
    except Exception as exc:
        if is_driver_error(exc):
            raise StorageUnavailable(f"{failure}: {_why(exc)}") from exc
        raise
    finally:
        await engine.dispose()


def _why(exc: BaseException) -> str:
    """`Type: first line of the driver's message` (SQLAlchemy's wrapper adds the SQL)."""
    orig = getattr(exc, "orig", None)
    inner = orig if isinstance(orig, BaseException) else exc
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[0][:200]}" if text else type(inner).__name__


def upgrade(url: str) -> None:
    """Sync wrapper of `upgrade_async` for a CLI (not from inside a running loop)."""
    asyncio.run(upgrade_async(url))


def current_revision(url: str) -> str | None:
    """Sync wrapper of `current_revision_async` (not from inside a running loop)."""
    return asyncio.run(current_revision_async(url))
