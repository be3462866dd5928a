"""Alembic environment of chatd's store.

Used two ways:
- programmatically by `storage.migrate`, which passes an open (sync-facing)
  connection in `config.attributes["connection"]`;
- from the `alembic` CLI (`alembic -c storage/alembic.ini upgrade head`), with
  the URL in `sqlalchemy.url` or `CHATD_DB`; it then opens an async engine.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from storage.schema import metadata
from storage.urls import normalize_url

config = context.config
target_metadata = metadata


def _url() -> str:
    url = os.environ.get("CHATD_DB") or config.get_main_option("sqlalchemy.url") or ""
    return normalize_url(url)


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_async_engine(_url())
    try:
        async with engine.connect() as conn:
            await conn.run_sync(_run)
            await conn.commit()
    finally:
        await engine.dispose()


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
    else:
        asyncio.run(_run_async())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
