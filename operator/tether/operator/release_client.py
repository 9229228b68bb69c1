"""The controller's admin API as the operator uses it: `handlers.ReleaseAdmin` over `AdminClient`.

Kept apart from the handlers so that they (and their tests) depend on three
methods, not on gRPC; this is the only module of the operator that talks to
the controller. An `ApplyRelease` goes out as the typed values it holds: the
admin client encodes them once (tether.spec.wire).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from tether.common import errors
from tether.common.admin_client import AdminClient
from tether.common.tls import ClientTLS
from tether.operator import reconcile


class ControllerAdmin:
    """`handlers.ReleaseAdmin` backed by the controller's AdminService."""

    def __init__(self, client: AdminClient) -> None:
        self.client = client

    async def apply(self, action: reconcile.ApplyRelease) -> reconcile.Applied:
        result = await self.client.apply_release(
            release=action.release,
            generation=action.generation,
            manifest_digest=action.manifest_digest,
            target=action.target,
            trigger=action.trigger,
            aggregation=action.aggregation,
            paused=action.paused,
            resources=action.resources,
            rollout=action.rollout,
            federated=action.federated,
        )
        return reconcile.Applied(version=result.version, changed=result.changed)

    async def delete(self, action: reconcile.DeleteRelease) -> reconcile.Deleted:
        return reconcile.Deleted(existed=await self.client.delete_release(action.release))

    async def observe(self, release: str, *, report_deadline_s: int | None = None) -> reconcile.ObservedRelease | None:
        try:
            return await self.client.get_release_status(release, report_deadline_s=report_deadline_s)
        except errors.NotFound:
            return None


@contextlib.asynccontextmanager
async def connect(
    target: str, token: str, *, timeout_s: float = 10.0, tls: ClientTLS | None = None
) -> AsyncIterator[ControllerAdmin]:
    """A `ControllerAdmin` on a fresh channel to `target` (TLS when `tls` names a CA), closed on exit."""
    async with AdminClient(target=target, token=token, timeout_s=timeout_s, tls=tls) as client:
        yield ControllerAdmin(client)
