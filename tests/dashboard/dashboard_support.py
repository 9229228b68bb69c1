"""A recorded upstream for the dashboard's tests: MLTask objects, release status and devices held in memory."""

from __future__ import annotations

import copy
import dataclasses
import datetime
from typing import Any

from tether.common import errors, rollout_controls
from tether.common.admin_client import DeviceSummary, ReleaseStatus

TOKEN = "test-dashboard-token-0123456789"
ADMIN_SECRET = "admin-secret-never-shown-4f1c"

HEALTH = {
    "version": 2,
    "stage": 1,
    "action": "progress",
    "stableVersion": 1,
    "stages": [
        {
            "index": 0,
            "eligible": 10,
            "installed": 10,
            "succeeded": 9,
            "failed": 1,
            "successRate": 0.9,
            "coverageSeconds": {"p50": 4.0, "p90": 9.0},
        },
        {"index": 1, "eligible": 50, "installed": 20, "succeeded": 15, "failed": 0, "successRate": 1.0},
    ],
}


def mltask(name: str = "digits", namespace: str = "ml", *, paused: bool = False) -> dict[str, Any]:
    return {
        "apiVersion": "tether.dev/v1alpha1",
        "kind": "MLTask",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "annotations": {"secret-url": "https://x?X-Amz-Signature=abc"},
        },
        "spec": {"paused": paused, "bundle": {"digest": "sha256:" + "a" * 64}},
        "status": {
            "phase": "Progressing",
            "stage": "gray",
            "release": f"{namespace}/{name}",
            "version": 2,
            "targeted": 60,
            "installed": 30,
            "succeeded": 24,
            "failed": 1,
            "conditions": [
                {
                    "type": "Progressing",
                    "status": "True",
                    "reason": "StageBaking",
                    "message": "stage gray bakes",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
            "rollout": {
                "phase": "Progressing",
                "version": 2,
                "currentStage": 1,
                "stages": [
                    {
                        "name": "beta",
                        "phase": "Passed",
                        "startedAt": "2026-01-01T00:00:00Z",
                        "gates": [{"metric": "successRate", "min": 0.8, "value": 0.9, "state": "Passed"}],
                    },
                    {
                        "name": "gray",
                        "phase": "Baking",
                        "startedAt": "2026-01-01T00:10:00Z",
                        "gates": [
                            {"metric": "devicesReporting", "min": 5, "value": 15, "state": "Passed"},
                            {"metric": "successRate", "min": 0.95, "value": 1.0, "state": "Passed"},
                        ],
                    },
                ],
            },
        },
    }


def release(name: str, *, health: Any = HEALTH, federated: Any = None, aggregate: Any = None) -> ReleaseStatus:
    return ReleaseStatus(
        release=name,
        version=2,
        manifest_digest="sha256:" + "a" * 64,
        targeted=60,
        notified=40,
        installed=30,
        succeeded=24,
        failed=1,
        refused=0,
        results=25,
        connected_devices=55,
        aggregate_round=3 if aggregate else 0,
        aggregate=aggregate,
        aggregate_json="",
        health=health,
        federated=federated,
    )


def device(i: int, **labels: str) -> DeviceSummary:
    return DeviceSummary(
        device_id=f"dev-{i:03d}",
        labels={"os": "android", "appVersion": "10.4", **labels},
        backends=("mnn/cpu",),
        selected_backends=("ml/digits/model=mnn/cpu/t2/fp32",),
        last_seen_unix=1_700_000_000.0,
        revoked=False,
        releases=(("ml/digits", 2, "installed"),),
        connected_replica="ctl-0",
    )


@dataclasses.dataclass
class Recorded:
    """An `upstream.Upstream` over documents the test owns; counts the calls each method took."""

    objects: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    releases: dict[str, ReleaseStatus] = dataclasses.field(default_factory=dict)
    fleet: list[DeviceSummary] = dataclasses.field(default_factory=list)
    event_docs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    calls: dict[str, int] = dataclasses.field(default_factory=dict)
    controls: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    user_tokens: list[str | None] = dataclasses.field(default_factory=list)  # the user each control was sent as
    kube_users: dict[str, bool] = dataclasses.field(default_factory=dict)  # token -> may list mltasks

    def _count(self, what: str) -> None:
        self.calls[what] = self.calls.get(what, 0) + 1

    async def namespaces(self) -> tuple[str | None, ...]:
        return (None,)

    async def tasks(self, namespace: str | None) -> list[dict[str, Any]]:
        self._count("tasks")
        return [copy.deepcopy(o) for o in self.objects.values()]

    async def task(self, namespace: str, name: str) -> dict[str, Any]:
        self._count("task")
        try:
            return copy.deepcopy(self.objects[f"{namespace}/{name}"])
        except KeyError:
            raise errors.NotFound(f"mltask {namespace}/{name} does not exist") from None

    async def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        self._count("events")
        return list(self.event_docs)

    async def release(self, name: str) -> ReleaseStatus | None:
        self._count("release")
        return self.releases.get(name)

    async def devices(self) -> list[DeviceSummary]:
        self._count("devices")
        return list(self.fleet)

    async def authenticate(self, token: str) -> None:
        if token not in self.kube_users:
            raise errors.Unauthenticated("the API server refused the credential (LIST mltasks)")
        if not self.kube_users[token]:
            raise errors.PermissionDenied("not allowed to LIST mltasks in ml")

    async def control(self, action: str, namespace: str, name: str, *, user_token: str | None = None) -> str:
        self.controls.append((action, namespace, name))
        self.user_tokens.append(user_token)
        obj = self.objects[f"{namespace}/{name}"]
        patch = rollout_controls.patch_for(action, now=datetime.datetime.now(datetime.UTC))
        obj["spec"].update(patch.get("spec", {}))
        return f"mltask {namespace}/{name}: {rollout_controls.PAST[action]}"
