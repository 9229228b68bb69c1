"""Shared fixtures: real services, started here unless the environment names them.

- TETHER_TEST_DATABASE_URL: an existing PostgreSQL server to use (a fresh
  database is created in it per test session); otherwise an embedded one starts.
- TETHER_TEST_BROKER_URL: an existing Redis to use as Celery broker; otherwise an
  embedded redis-server starts on a free loopback port.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    from tether.controller.embedded import EmbeddedPostgres

    if os.environ.get("TETHER_TEST_DATABASE_URL"):
        yield os.environ["TETHER_TEST_DATABASE_URL"]
        return
    pg = EmbeddedPostgres().start()
    try:
        yield pg.url
    finally:
        pg.stop()


@pytest.fixture()
def database_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh, empty database on the session's server, dropped afterwards."""
    import psycopg
    from psycopg import conninfo, sql

    name = f"tether_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = conninfo.conninfo_to_dict(postgres_server_url)
    params["dbname"] = name
    yield conninfo.make_conninfo(**params)
    with psycopg.connect(postgres_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    from tether.controller.embedded import EmbeddedRedis

    if os.environ.get("TETHER_TEST_BROKER_URL"):
        yield os.environ["TETHER_TEST_BROKER_URL"]
        return
    r = EmbeddedRedis().start()
    try:
        yield r.url
    finally:
        r.stop()
