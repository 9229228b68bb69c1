"""Fixtures for the controller data plane (the controller itself, its config and clients: tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tether.controller import db, store


@pytest.fixture()
async def pg_store(database_url: str) -> AsyncIterator[store.Store]:
    db.migrate(database_url)
    pool = await db.open_pool(database_url, max_size=4)
    try:
        yield store.Store(pool)
    finally:
        await pool.close()
