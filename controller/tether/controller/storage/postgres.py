"""The Postgres storage: the aggregates over one connection pool (one database for all replicas)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tether.controller.storage import contracts, pg_bundles, pg_devices, pg_releases, pg_results, pg_rounds

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool


def postgres_storage(pool: AsyncConnectionPool) -> contracts.Storage:
    return contracts.Storage(
        devices=pg_devices.PostgresDevices(pool),
        bundles=pg_bundles.PostgresBundles(pool),
        releases=pg_releases.PostgresReleases(pool),
        results=pg_results.PostgresResults(pool),
        rounds=pg_rounds.PostgresRounds(pool),
    )
