"""A staged rollout through Kopf on the Kubernetes emulator: status, events, `tether rollout` requests,
and validation errors that leave the running rollout alone."""

from __future__ import annotations

import json
from typing import Any

from operator_helpers import FakeAdmin, mltask, running_operator, wait_for

from tether.cli import rollout as rollout_cli
from tether.devtools.emulator import EmulatedCluster
from tether.operator import reconcile

STAGES = [
    {"name": "canary", "percent": 50, "bakeSeconds": 3600, "gates": [{"metric": "errorRate", "max": 0.1}]},
    {"name": "full", "percent": 100, "bakeSeconds": 3600},
]


class HealthAdmin(FakeAdmin):
    """The fake controller, with per-stage health for the stage it was last told about."""

    def __init__(self) -> None:
        super().__init__()
        self.eligible = 0

    def documents(self) -> list[dict[str, Any]]:
        return [
            json.loads(c.rollout_json) if c.rollout_json else {}
            for c in self.calls
            if isinstance(c, reconcile.ApplyRelease)
        ]

    async def observe(self, release: str, *, report_deadline_s: int | None = None) -> reconcile.ObservedRelease | None:
        base = await super().observe(release, report_deadline_s=report_deadline_s)
        if base is None or not self.documents():
            return base
        doc = self.documents()[-1]
        stage = doc.get("stage", 0) if doc.get("version") == base.version else 0
        stages = [
            {"index": j, "eligible": self.eligible * (j + 1), "installed": self.eligible, "succeeded": self.eligible}
            for j in range(2)
        ]
        health = {
            "version": base.version,
            "stage": stage,
            "action": doc.get("action", "progress"),
            "stableVersion": 0,
            "stages": stages,
        }
        return reconcile.Observation(release=release, version=base.version, health=health)


async def rollout_status(cluster: EmulatedCluster, name: str) -> dict[str, Any]:
    obj = await cluster.get(None, name)
    return ((obj or {}).get("status") or {}).get("rollout") or {}


async def test_status_events_requests_and_validation_on_the_emulator(cluster: EmulatedCluster) -> None:
    admin = HealthAdmin()
    async with running_operator(cluster, admin):
        await cluster.create(mltask("staged", rollout={"stages": STAGES}))

        async def progressing() -> dict[str, Any] | None:
            r = await rollout_status(cluster, "staged")
            return r if r.get("phase") == "Progressing" and r.get("appliedDocument") else None

        r = await wait_for(progressing, what="a progressing rollout")
        obj = await cluster.get(None, "staged")
        assert obj["status"]["stage"] == "1/2" and obj["status"]["phase"] == "Progressing"
        assert admin.documents()[-1]["stage"] == 0 and admin.documents()[-1]["version"] == 1
        assert [s["name"] for s in r["stages"]] == ["canary", "full"]

        admin.eligible = 7

        async def counted() -> dict[str, Any] | None:
            r = await rollout_status(cluster, "staged")
            return r if r["stages"][0].get("eligible") == 7 else None

        await wait_for(counted, what="stage counts from the controller")

        # `tether rollout promote` patches an annotation; the operator moves to the next stage.
        message = await rollout_cli.request(
            "promote", "staged", namespace=cluster.namespace, kubeconfig=str(cluster.kubeconfig_path)
        )
        assert message == f"mltask {cluster.namespace}/staged: promotion requested"

        async def promoted() -> dict[str, Any] | None:
            r = await rollout_status(cluster, "staged")
            return r if r.get("currentStage") == 1 else None

        r = await wait_for(promoted, what="stage 2 after promote")
        assert r["stages"][0]["phase"] == "Promoted"
        assert admin.documents()[-1]["stage"] == 1

        # An invalid edit: Invalid phase, a warning naming the field, the rollout untouched, nothing sent.
        sent = len(admin.calls)
        bad = [{"percent": 60}, {"percent": 30}, {"percent": 100}]
        await cluster.patch(None, "staged", {"spec": {"rollout": {"stages": bad}}})

        async def invalid() -> dict[str, Any] | None:
            obj = await cluster.get(None, "staged")
            return obj if obj["status"].get("phase") == "Invalid" else None

        obj = await wait_for(invalid, what="phase Invalid")
        assert obj["status"]["rollout"]["currentStage"] == 1 and obj["status"]["rollout"]["phase"] == "Progressing"
        assert len(admin.calls) == sent

        # Fixed again, then `tether rollout abort`: every device goes back (a rollback document).
        await cluster.patch(None, "staged", {"spec": {"rollout": {"stages": STAGES}}})
        await rollout_cli.request(
            "abort", f"{cluster.namespace}/staged", namespace=None, kubeconfig=str(cluster.kubeconfig_path)
        )

        async def rolled_back() -> dict[str, Any] | None:
            obj = await cluster.get(None, "staged")
            return obj if obj["status"].get("phase") == "RolledBack" else None

        obj = await wait_for(rolled_back, what="phase RolledBack")
        assert admin.documents()[-1]["action"] == "rollback"
        conditions = {c["type"]: c for c in obj["status"]["conditions"]}
        assert conditions["RolledBack"]["status"] == "True" and conditions["RolledBack"]["reason"] == "Aborted"
        assert conditions["Progressing"]["reason"] == "RolloutRolledBack"

        events = await cluster.events_for(None, "staged")
        reasons = [(e["type"], e["reason"]) for e in events]
        for expected in (
            ("Normal", "RolloutStarted"),
            ("Normal", "StagePromoted"),
            ("Warning", "InvalidSpec"),
            ("Warning", "RolledBack"),
            ("Warning", "PhaseRolledBack"),
        ):
            assert expected in reasons, reasons


def test_the_cli_patches() -> None:
    import datetime

    now = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    assert rollout_cli.patch_for("pause", now=now) == {"spec": {"paused": True}}
    assert rollout_cli.patch_for("resume", now=now) == {
        "spec": {"paused": False},
        "metadata": {"annotations": {"tether.dev/resume": "2026-01-02T03:04:05.000000Z"}},
    }
    assert rollout_cli.patch_for("abort", now=now)["metadata"]["annotations"] == {
        "tether.dev/abort": "2026-01-02T03:04:05.000000Z"
    }
