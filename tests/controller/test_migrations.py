import psycopg

from tether.controller import db


def test_migrations_apply_once_and_create_the_schema(database_url):
    first = db.migrate(database_url)
    assert first == [name for name, _ in db.migration_files()]
    assert db.migrate(database_url) == []
    with psycopg.connect(database_url) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"devices", "blobs", "manifests", "releases", "deliveries", "results", "aggregates"} <= tables
