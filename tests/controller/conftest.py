"""Fixtures for the controller data plane (the controller itself, its config and clients: tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tether.controller import db, delivery_reports, release_cache
from tether.controller.storage import contracts, memory, postgres


@pytest.fixture()
async def pg_storage(database_url: str) -> AsyncIterator[contracts.Storage]:
    db.migrate(database_url)
    pool = await db.open_pool(database_url, max_size=4)
    try:
        yield postgres.postgres_storage(pool)
    finally:
        await pool.close()


@pytest.fixture(params=["memory", "postgres"])
async def storage(request: pytest.FixtureRequest) -> AsyncIterator[contracts.Storage]:
    """Each storage implementation in turn: the contract suites run every case on both."""
    if request.param == "memory":
        yield memory.memory_storage()
        return
    database_url = request.getfixturevalue("database_url")
    db.migrate(database_url)
    pool = await db.open_pool(database_url, max_size=8)  # concurrent-update cases hold several connections
    try:
        yield postgres.postgres_storage(pool)
    finally:
        await pool.close()


@pytest.fixture()
def pg_reporter(pg_storage: contracts.Storage) -> delivery_reports.DeliveryReporter:
    """Delivery reports group-committed into `pg_storage`, as the controller writes them."""
    return delivery_reports.DeliveryReporter(pg_storage.releases)


@pytest.fixture()
def pg_release_cache(pg_storage: contracts.Storage) -> release_cache.ReleaseCache:
    """Releases of `pg_storage` as one controller process reads them ("may read" answers kept briefly)."""
    return release_cache.ReleaseCache(pg_storage.releases)
