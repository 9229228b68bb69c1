"""Handing accepted results to aggregation, without importing the task code.

The controller sends `tether.aggregate` by name (internals.md) after the
upload's transaction committed. Publishing to the broker is blocking network
I/O, so `CeleryEnqueuer` runs it in a thread and never stalls the event loop.
A failed publish surfaces as `EnqueueFailed` (UNAVAILABLE): the result is
already stored, the agent retries with the same idempotency key, and the
duplicate path enqueues again, so a broker outage delays aggregation but loses
nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from tether.common import errors, tracing

if TYPE_CHECKING:
    import celery

log = logging.getLogger(__name__)

AGGREGATE_TASK = "tether.aggregate"
AGGREGATE_ROUND_TASK = "tether.fl.aggregate_round"


class EnqueueFailed(errors.TetherError):
    """The broker did not take the message; retrying the call is safe."""

    code = "UNAVAILABLE"


@runtime_checkable
class Enqueuer(Protocol):
    """Where the controller sends "aggregate this (release, version) again"."""

    async def enqueue(self, *, release: str, version: int) -> None:
        """Publish once; raise EnqueueFailed when the message was not accepted.

        An implementation may also offer `async close()`; the server calls it at stop.
        """
        ...


class CeleryEnqueuer:
    """Sends `tether.aggregate` with kwargs {"release", "version"} to a Celery broker."""

    def __init__(self, broker_url: str, *, publish_retries: int = 3, connect_timeout_s: float = 5.0) -> None:
        import celery

        self._app: celery.Celery = celery.Celery("tether-controller", broker=broker_url, set_as_current=False)
        self._app.conf.update(
            task_serializer="json",
            accept_content=["json"],
            broker_connection_timeout=connect_timeout_s,
            broker_connection_retry_on_startup=True,
            task_ignore_result=True,
        )
        self._retry_policy = {
            "max_retries": publish_retries,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 2,
        }

    async def enqueue(self, *, release: str, version: int) -> None:
        try:  # the trace context rides in the message's headers (the worker's span joins the upload's trace)
            await asyncio.to_thread(self._send, release, version, tracing.inject())
        except Exception as e:  # kombu/redis errors vary by transport: all mean "not published"
            log.warning("enqueue of %s v%d failed: %s", release, version, e)
            raise EnqueueFailed(f"aggregation could not be enqueued ({type(e).__name__}); retry the upload") from e

    async def enqueue_round(self, task: str, number: int) -> None:
        """Send `tether.fl.aggregate_round` for a federated round (idempotent on the worker's side)."""
        try:
            await asyncio.to_thread(
                self._app.send_task,
                AGGREGATE_ROUND_TASK,
                kwargs={"task": task, "round": number},
                retry=True,
                retry_policy=self._retry_policy,
            )
        except Exception as e:
            log.warning("enqueue of round %d of %s failed: %s", number, task, e)
            raise EnqueueFailed(f"round aggregation could not be enqueued ({type(e).__name__})") from e

    def _send(self, release: str, version: int, headers: dict[str, str] | None = None) -> None:
        self._app.send_task(
            AGGREGATE_TASK,
            kwargs={"release": release, "version": version},
            headers=headers or None,
            retry=True,
            retry_policy=self._retry_policy,
        )

    async def close(self) -> None:
        await asyncio.to_thread(self._app.close)
