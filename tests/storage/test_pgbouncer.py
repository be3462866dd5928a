"""The store behind PgBouncer in transaction pooling mode (`?statement_cache_size=0`): the
Debian package is 1.18, which cannot carry named prepared statements from one
transaction to the next, so neither the writer nor the readers may rely on them. Two
server connections serve every client connection of the store (and of a second store),
so any statement that leaked out of its transaction would meet another client's."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio
from sqlalchemy.engine import make_url

from storage.base import Store
from storage.urls import pg_statement_cache_size
from tests.storage import test_store_contract as contract
from tests.storage.helpers import run_case
from tests.storage.pgbouncer import pgbouncer

CONTRACT: list[Callable[[Store], Awaitable[None]]] = [
    contract.test_seq_per_conversation_and_curs,
    contract.test_concurrent_sends_no_gaps,
    contract.test_cmid_dedupe,
    contract.test_cmid_dedupe_inside_one_batch,
    contract.test_failing_op_does_not_fail_its_batch,
    contract.test_a_value_the_database_refuses_fails_only_its_own_op,
    contract.test_read_implies_delivered_single_event,
    contract.test_undelivered,
    contract.test_history_paging,
    contract.test_convs_order_unread_and_peer_marks,
]


@pytest_asyncio.fixture
async def bouncer_url(pg_url: str) -> AsyncIterator[str]:
    u = make_url(pg_url)
    async with pgbouncer(u.host or "127.0.0.1", u.port or 5432, u.username or "postgres") as port:
        yield (
            u.set(port=port)
            .update_query_dict({"statement_cache_size": "0"})
            .render_as_string(hide_password=False)
        )


@pytest.mark.parametrize("case", CONTRACT, ids=lambda f: f.__name__.removeprefix("test_"))
async def test_contract_behind_pgbouncer(
    bouncer_url: str, case: Callable[[Store], Awaitable[None]]
) -> None:
    await run_case(case, bouncer_url)


async def test_two_stores_behind_pgbouncer(bouncer_url: str) -> None:
    await contract.test_two_stores_on_one_database(bouncer_url)


async def test_two_stores_taking_turns_behind_pgbouncer(bouncer_url: str) -> None:
    await contract.test_two_stores_taking_turns(bouncer_url)


def test_the_statement_cache_option_leaves_the_url() -> None:
    url, size = pg_statement_cache_size("postgresql://u@h:6432/d?statement_cache_size=0")
    assert (url, size) == ("postgresql+asyncpg://u@h:6432/d", 0)
    assert pg_statement_cache_size("postgres://u@h/d") == ("postgresql+asyncpg://u@h/d", None)
    assert pg_statement_cache_size("chat.db?x") == ("sqlite+aiosqlite:///chat.db?x", None)
    with pytest.raises(ValueError):
        pg_statement_cache_size("postgresql://u@h/d?statement_cache_size=off")
