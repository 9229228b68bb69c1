"""Federated learning's pure core: update checks, strategies, privacy, rounds and participant sampling.

Nothing in this package does I/O: the Celery worker, the storage and the
gRPC services call into it with values they read, and act on what it returns.
"""
