"""The only module that talks to the controller (admin API) and the Kubernetes API.

`Upstream` is what the rest of the dashboard needs, as a Protocol, so the app's tests can hand
in recorded documents; `Live` is the real one: one `AdminClient` channel and one `KubeClient`
session for the process, opened at start. Rollout controls go through `tether.common.rollout_controls`,
the patches `tether rollout` sends, with the dashboard's Kubernetes credentials (the cluster's RBAC
decides; the chart grants `patch` on mltasks only when controls are enabled).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from tether.common import errors, kube, rollout_controls
from tether.common.admin_client import AdminClient, DeviceSummary, ReleaseStatus
from tether.dashboard import settings as settings_mod


class Upstream(Protocol):
    async def namespaces(self) -> tuple[str | None, ...]: ...
    async def tasks(self, namespace: str | None) -> list[dict[str, Any]]: ...
    async def task(self, namespace: str, name: str) -> dict[str, Any]: ...
    async def events(self, namespace: str, name: str) -> list[dict[str, Any]]: ...
    async def release(self, release: str) -> ReleaseStatus | None: ...
    async def devices(self) -> list[DeviceSummary]: ...
    async def control(self, action: str, namespace: str, name: str, *, user_token: str | None = None) -> str: ...
    async def authenticate(self, token: str) -> None: ...


class Live:
    """The controller and the API server, reached once per call through long-lived clients."""

    MAX_DEVICES = 5000  # the fleet page shows at most this many (the inventory is paged upstream)

    def __init__(self, settings: settings_mod.Settings) -> None:
        self._settings = settings
        self._admin: AdminClient | None = None
        self._kube: kube.KubeClient | None = None
        self._default_ns = "default"
        self._credentials: kube.Credentials | None = None

    async def start(self) -> None:
        credentials = self._credentials = await kube.load(self._settings.kubeconfig)
        self._default_ns = credentials.namespace
        self._kube = await kube.KubeClient(credentials).__aenter__()
        self._admin = AdminClient(self._settings.controller, token=self._settings.admin_token, tls=self._settings.tls)

    async def close(self) -> None:
        if self._admin is not None:
            await self._admin.close()
        if self._kube is not None:
            await self._kube.__aexit__(None, None, None)

    @property
    def _k(self) -> kube.KubeClient:
        if self._kube is None:
            raise RuntimeError("Live.start() was not awaited")
        return self._kube

    @property
    def _a(self) -> AdminClient:
        if self._admin is None:
            raise RuntimeError("Live.start() was not awaited")
        return self._admin

    async def namespaces(self) -> tuple[str | None, ...]:
        wanted = self._settings.namespaces
        if wanted == ("*",):
            return (None,)
        return wanted or (self._default_ns,)

    async def tasks(self, namespace: str | None) -> list[dict[str, Any]]:
        return await self._k.list_mltasks(namespace)

    async def task(self, namespace: str, name: str) -> dict[str, Any]:
        return await self._k.get_mltask(namespace, name)

    async def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return await self._k.list_events(namespace, name)

    async def release(self, release: str) -> ReleaseStatus | None:
        try:
            return await self._a.get_release_status(release)
        except errors.NotFound:
            return None

    async def devices(self) -> list[DeviceSummary]:
        return await self._a.list_devices(page_size=1000, limit=self.MAX_DEVICES)

    async def control(self, action: str, namespace: str, name: str, *, user_token: str | None = None) -> str:
        """The rollout patch, as the dashboard's credentials, or as the logged-in user's (`--auth kubernetes`)."""
        if user_token is None:
            return await rollout_controls.apply(self._k, action, namespace, name)
        async with kube.KubeClient(self._as(user_token)) as client:
            return await rollout_controls.apply(client, action, namespace, name)

    async def authenticate(self, token: str) -> None:
        """Accept a Kubernetes bearer token that may list the MLTasks of every namespace shown, else raise.

        `errors.Unauthenticated` when the API server does not know the token, `errors.PermissionDenied`
        when its user may not list them (the cluster's RBAC: the same a `kubectl get mltasks` would meet).
        """
        async with kube.KubeClient(self._as(token)) as client:
            for namespace in await self.namespaces():
                await client.list_mltasks(namespace)

    def _as(self, token: str) -> kube.Credentials:
        if self._credentials is None:
            raise RuntimeError("Live.start() was not awaited")
        return kube.as_user(self._credentials, token)


async def gather_tasks(upstream: Upstream) -> list[dict[str, Any]]:
    """Every MLTask of the namespaces the dashboard shows."""
    lists = await asyncio.gather(*(upstream.tasks(ns) for ns in await upstream.namespaces()))
    return [obj for objs in lists for obj in objs]
