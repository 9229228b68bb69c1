"""A real controller for tests in any directory: its config, a stand-in for the broker, starting and stopping it.

A top-level module (tests have no packages): tests/conftest.py is imported from tests/, which pytest's default
"prepend" import mode puts on sys.path, so `from controller_support import ...` works from every tests/<dir>.
The fixtures built on it (`controller_config`, `enqueuer`, `controller`, `start`, `admin_client`,
`devices_stub`) are in tests/conftest.py.

Nothing here imports tether.controller or psycopg at module level: the agent's tests run without them.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from tether.common import config

if TYPE_CHECKING:
    from tether.controller import blobs, server

ADMIN_TOKEN = "admin-token-for-tests"
BOOTSTRAP_TOKEN = "bootstrap-token-for-tests"
TABLES = ("devices", "blobs", "manifests", "releases", "deliveries", "results", "aggregates")


class RecordingEnqueuer:
    """Test double of the broker: records what would have been sent to Celery; `fail` makes it fail like one down."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail = False

    async def enqueue(self, *, release: str, version: int) -> None:
        if self.fail:
            from tether.controller.enqueue import EnqueueFailed

            raise EnqueueFailed("broker down (test)")
        self.calls.append((release, version))


def controller_config(
    database_url: str,
    blob_dir: pathlib.Path,
    *,
    admin_token: str = ADMIN_TOKEN,
    bootstrap_token: str = BOOTSTRAP_TOKEN,
    grace_s: float = 0.5,
    pool_max_size: int = 5,
    **overrides: Any,
) -> config.ControllerConfig:
    """A controller on 127.0.0.1:0 (a free port) over `database_url`, blobs in `blob_dir`; `overrides` as named."""
    return config.ControllerConfig(
        database_url=database_url,
        admin_token=admin_token,
        bootstrap_token=bootstrap_token,
        listen="127.0.0.1:0",
        blob_dir=blob_dir,
        grace_s=grace_s,
        pool_max_size=pool_max_size,
        **overrides,
    )


async def start_controller(
    cfg: config.ControllerConfig,
    *,
    enqueuer: Any = None,
    blob_store: blobs.BlobStore | None = None,
) -> server.RunningController:
    """`server.start_controller`, with a RecordingEnqueuer unless given one (never Celery); the caller stops it."""
    from tether.controller import server

    return await server.start_controller(
        cfg, enqueuer=RecordingEnqueuer() if enqueuer is None else enqueuer, blob_store=blob_store
    )


@contextlib.asynccontextmanager
async def running_controller(
    cfg: config.ControllerConfig,
    *,
    enqueuer: Any = None,
    blob_store: blobs.BlobStore | None = None,
    grace: float | None = None,
) -> AsyncIterator[server.RunningController]:
    """A controller started as `start_controller` does, stopped on the way out (`grace`: cfg.grace_s unless given)."""
    running = await start_controller(cfg, enqueuer=enqueuer, blob_store=blob_store)
    try:
        yield running
    finally:
        await running.stop(grace=grace)


def snapshot(database_url: str) -> dict[str, list[str]]:
    """Every row of every table, minus timestamps: for "nothing changed" assertions."""
    import psycopg

    out = {}
    with psycopg.connect(database_url) as conn:
        for t in TABLES:
            cols = [
                r[0]
                for r in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = %s"
                    " AND data_type NOT LIKE 'timestamp%%' ORDER BY ordinal_position",
                    (t,),
                )
            ]
            out[t] = sorted(map(repr, conn.execute(f"SELECT {', '.join(cols)} FROM {t}").fetchall()))
    return out
