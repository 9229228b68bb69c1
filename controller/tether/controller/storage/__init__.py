"""The controller's storage, split by aggregate, each behind a Protocol (`storage.contracts`).

Two implementations of every Protocol: Postgres (`pg_*`, the system of
record in production, shared by every replica) and memory (`memory`, for
tests of logic that has no SQL and for a single process without a
database). One contract test suite runs against both
(tests/controller/test_storage_contract.py), so they cannot drift apart.
"""
