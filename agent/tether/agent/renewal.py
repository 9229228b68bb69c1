"""Keeping the device credential fresh: renew before it expires, re-enrol when it cannot be renewed.

A device credential (`tether.common.credentials`) carries its expiry. While
the agent runs, `alongside(agent, work)` runs `work` (the event stream) and a
renewal loop next to it: the loop sleeps until about two thirds of the
credential's remaining lifetime have passed (with jitter, so a fleet enrolled
at once does not renew at once), then calls `RenewCredential` and stores the
new credential in `state.json` before using it.

- A transient failure (controller unreachable) is retried with backoff; the
  credential keeps working meanwhile.
- UNAUTHENTICATED (it expired while the device was off, or it was superseded)
  falls back to enrolling again with the bootstrap token, when the agent has
  one; a revoked device is refused there too and keeps retrying slowly,
  running nothing.
- A credential without an expiry (an older controller) is left alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import grpc

from tether.agent import client as client_mod
from tether.common import credentials

if TYPE_CHECKING:
    from tether.agent.daemon import Agent

log = logging.getLogger(__name__)

MIN_DELAY_S = 1.0
POLL_S = 5.0
RETRY_S = (2.0, 300.0)  # first and longest wait between failed attempts
JITTER = 0.1


def renewal_delay(*, remaining_s: float, jitter: float) -> float:
    """Seconds to wait before renewing a credential with `remaining_s` left (`jitter` in [0, 1))."""
    return max(MIN_DELAY_S, remaining_s * 2.0 / 3.0 * (1.0 - JITTER * jitter))


async def alongside(agent: Agent, work: Awaitable[Any]) -> Any:
    """Run `work` with the renewal loop beside it; the loop ends when `work` does."""
    loop = asyncio.create_task(keep_fresh(agent), name=f"renew:{agent.device_id}")
    try:
        return await work
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


async def keep_fresh(agent: Agent) -> None:
    failures = 0
    # Checked on every turn, not left to cancellation alone: a cancel that lands as a gRPC call
    # completes can be swallowed by grpc.aio, and once stopping, `_sleep` no longer waits.
    while not agent._stopping.is_set():
        expires = credentials.expires_at(agent.state.credential)
        if expires is None:
            await agent._sleep(POLL_S)  # enrolling, or a credential without expiry: look again soon
            continue
        wait = renewal_delay(remaining_s=expires - agent.clock(), jitter=agent._rng.random())
        if failures:
            wait = min(wait, min(RETRY_S[1], RETRY_S[0] * 2 ** min(failures - 1, 16)))
        await agent._sleep(wait)
        if agent._stopping.is_set():
            return
        if credentials.expires_at(agent.state.credential) != expires:
            failures = 0
            continue  # enrolled again meanwhile (the stream saw UNAUTHENTICATED): plan anew
        try:
            await renew_once(agent)
            failures = 0
        except asyncio.CancelledError:
            raise
        except Exception as e:
            failures += 1
            level = logging.INFO if client_mod.is_retryable(e) else logging.WARNING
            log.log(level, "credential renewal of %s failed: %s", agent.device_id, e)


async def renew_once(agent: Agent) -> None:
    """Renew now; on UNAUTHENTICATED enrol again (with the bootstrap token). Raises what it could not fix."""
    client = agent._client
    assert client is not None
    presented = client.credential
    try:
        response = await client.renew_credential()
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.UNAUTHENTICATED or not agent.bootstrap_token:
            raise
        if agent.state.credential != presented:
            return  # the stream already enrolled again meanwhile
        log.warning("credential of %s cannot be renewed (%s); enrolling again", agent.device_id, e.details())
        await agent._enroll()
        return
    # The old credential stopped working when the controller answered: switch at once, then persist.
    agent.state.credential = response.credential
    client.credential = response.credential
    await asyncio.to_thread(agent._save)
    log.info("renewed the credential of %s (valid until %d)", agent.device_id, response.expires_at)
