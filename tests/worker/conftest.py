"""Fixtures for the aggregation tests (helpers live in worker_helpers.py)."""

from __future__ import annotations

import pathlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from worker_helpers import WorkerFactory


@pytest.fixture()
def migrated_url(database_url: str) -> str:
    from tether.controller import db

    db.migrate(database_url)
    return database_url


@pytest.fixture()
def conn(migrated_url: str) -> Iterator[Any]:
    import psycopg

    with psycopg.connect(migrated_url, autocommit=True) as c:
        yield c


@pytest.fixture()
def workers(broker_url: str, database_url: str, tmp_path: pathlib.Path) -> Iterator[WorkerFactory]:
    factory = WorkerFactory(broker_url, database_url, f"tether-test-{uuid.uuid4().hex[:12]}", tmp_path)
    try:
        yield factory
    finally:
        for w in factory.started:
            w.stop()


@pytest.fixture()
def sender(broker_url: str) -> Iterator[Any]:
    """A producer-only Celery app, as the controller would hold."""
    from tether.controller import tasks

    app = tasks.make_app(broker_url)
    try:
        yield app
    finally:
        app.close()
