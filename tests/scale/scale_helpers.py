"""Helpers of the scale tests (imported as a top-level module: tests have no packages)."""

from __future__ import annotations

ADMIN_TOKEN = "admin-token-for-scale-tests"
BOOTSTRAP_TOKEN = "bootstrap-token-for-scale-tests"


class NullEnqueuer:
    async def enqueue(self, *, release: str, version: int) -> None:
        return None
