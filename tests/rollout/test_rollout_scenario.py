"""Given 1,000 devices of mixed attributes, when a task rolls out beta -> gray -> full, then exactly the devices
the policy names get it at each stage; when devices start failing, the gate fails and every device ends back on
the previous version.

Real parts: the controller (gRPC admin API, Postgres store, cohort thresholds, fan-out), the operator's
`reconcile.decide` and rollout state machine. Simulated: the devices' reports (through the controller's store)
and the clock (bake times pass without sleeping).
"""

from __future__ import annotations

import math
import pathlib

import pytest
from controller_support import ADMIN_TOKEN
from rollout_helpers import (
    OperatorLoop,
    SimDevice,
    Simulation,
    desired,
    enroll_all,
    mixed_fleet,
    start,
    upload,
)

from tether.common import admin_client
from tether.controller import cohorts, devices
from tether.operator.task_status import Phase, RolloutPhase
from tether.spec import versions

RELEASE = "ml/scenario"
N = 1000


def targeted(d: SimDevice) -> bool:
    """The policy's target, written out independently of the controller's evaluation."""
    app = versions.parse_version(d.attributes["appVersion"])
    return (
        d.attributes["os"] in ("android", "ios")
        and app is not None
        and versions.parse_version("10.2") <= app < versions.parse_version("12")  # type: ignore[operator]
        and d.attributes["tier"] != "low"
    )


def spec(digest: str) -> dict:
    return {
        "bundle": {"digest": digest},
        "target": {
            "matchExpressions": [{"key": "os", "operator": "In", "values": ["android", "ios"]}],
            "matchVersions": {"appVersion": ">=10.2,<12"},
            "exclude": [{"matchLabels": {"tier": "low"}}],
        },
        "rollout": {
            "stages": [
                {
                    "name": "beta",
                    "cohort": {"matchLabels": {"cohort": "beta"}},
                    "bakeSeconds": 600,
                    "gates": [{"metric": "devicesReporting", "min": 5}, {"metric": "successRate", "min": 0.95}],
                },
                {
                    "name": "gray",
                    "percent": 10,
                    "bakeSeconds": 1800,
                    "gates": [
                        {"metric": "errorRate", "max": 0.05},
                        {"metric": "p95LatencySeconds", "max": 2.0},
                        {"metric": "task.accuracy", "min": 0.8},
                    ],
                },
                {
                    "name": "full",
                    "percent": 100,
                    "bakeSeconds": 3600,
                    "gates": [{"metric": "devicesReporting", "min": 50}, {"metric": "errorRate", "max": 0.05}],
                    "onGateFailure": "Rollback",
                },
            ]
        },
    }


async def test_beta_gray_full_reach_exactly_the_named_devices_and_a_failing_gate_rolls_everyone_back(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    fleet = mixed_fleet(N)
    want = {d.device_id for d in fleet if targeted(d)}
    beta = {d.device_id for d in fleet if d.device_id in want and d.attributes.get("cohort") == "beta"}
    assert 300 < len(want) < 700 and len(beta) >= 5  # a meaningful mix

    running = await start(database_url, tmp_path)
    try:
        async with admin_client.AdminClient(target=running.address, token=ADMIN_TOKEN) as client:
            v1_digest = await upload(client, tmp_path / "v1", {"task.py": b"def run(ctx):\n    return {}\n"})
            v2_digest = await upload(
                client,
                tmp_path / "v2",
                {"task.py": b"def run(ctx):\n    return {'sample_count': 1}\n"},  # only this file changes
            )
            await enroll_all(running.storage.devices, fleet)
            sim = Simulation(running, fleet, RELEASE)

            # Version 1 goes everywhere at once (one plain stage) and completes.
            op = OperatorLoop(client, {**spec(v1_digest), "rollout": {"stages": [{"percent": 100}]}})
            await op.reconcile()
            served = await sim.converge()
            assert {k for k, v in served.items() if v == (1, False)} == want
            assert (await op.advance(1)).phase == Phase.SUCCEEDED

            # Version 2: staged. Stage 1 (beta) reaches exactly the beta testers among the targeted devices.
            op.spec, op.generation = spec(v2_digest), 2
            status = await op.advance(1)
            assert status.version == 2 and status.rollout is not None
            assert (status.rollout.phase, status.rollout.current_stage, status.stage) == (
                RolloutPhase.PROGRESSING,
                0,
                "1/3",
            )
            served = await sim.converge()
            assert {k for k, v in served.items() if v == (2, False)} == beta
            assert {k for k, v in served.items() if v == (1, True)} == want - beta  # the others keep version 1
            assert all(served[d.device_id] is None for d in fleet if d.device_id not in want)

            # Gates pass, but the bake has not ended: the stage holds.
            status = await op.advance(300)
            assert status.rollout.current_stage == 0  # type: ignore[union-attr]
            assert [g.state for g in status.rollout.stages[0].gates] == ["Passed", "Passed"]  # type: ignore[union-attr]
            assert status.rollout.stages[0].eligible == len(beta)  # type: ignore[union-attr]

            # Bake over: stage 2 (gray) = beta + exactly 10 % of the targeted devices by stable hash.
            status = await op.advance(301)
            assert (status.rollout.current_stage, status.stage) == (1, "2/3")  # type: ignore[union-attr]
            ranked = sorted(want, key=lambda i: cohorts.bucket(RELEASE, i))[: math.ceil(0.10 * len(want))]
            gray = beta | set(ranked)
            served = await sim.converge()
            assert {k for k, v in served.items() if v == (2, False)} == gray
            assert {k for k, v in served.items() if v == (1, True)} == want - gray

            # A controller restart mid-stage changes nobody's cohort: thresholds live in Postgres.
            await running.stop(grace=0.2)
            running = await start(database_url, tmp_path)
            sim.st = running
            async with admin_client.AdminClient(target=running.address, token=ADMIN_TOKEN) as client2:
                op.client = client2
                assert await desired(running.storage.releases, fleet, RELEASE) == served

                # A device enrolling late (or upgrading its app into range) is picked up by the rollout.
                late = SimDevice("dev-late-1", {"os": "android", "appVersion": "10.1.0", "tier": "high"})
                info = devices.validate_info(attributes=late.attributes, backends=("mnn/cpu",))
                await running.storage.devices.enroll_device(device_id=late.device_id, info=info)
                assert (await desired(running.storage.releases, [late], RELEASE))[late.device_id] is None  # 10.1 < 10.2
                late.attributes["appVersion"] = "10.4.1"
                info = devices.validate_info(attributes=late.attributes, backends=("mnn/cpu",))
                await running.storage.devices.enroll_device(device_id=late.device_id, info=info)
                in_gray = cohorts.bucket(RELEASE, late.device_id) < cohorts.threshold(
                    [cohorts.bucket(RELEASE, i) for i in want], percent=10
                )
                expected_late = (2, False) if in_gray else (1, True)
                assert (await desired(running.storage.releases, [late], RELEASE))[late.device_id] == expected_late

                status = await op.advance(1800)
                gray_stage = status.rollout.stages[1]  # type: ignore[union-attr]
                assert gray_stage.phase == "Passed"
                assert gray_stage.eligible == len(gray | ({late.device_id} if in_gray else set()))
                assert gray_stage.success_rate == 1.0 and gray_stage.metrics == {"accuracy": pytest.approx(0.92)}
                assert status.rollout.current_stage == 2 and status.stage == "3/3"  # type: ignore[union-attr]

                # Stage 3 (full): every targeted device gets version 2 ... and 20 % of the new ones fail.
                fresh = sorted(want - gray)
                failing = frozenset(fresh[::5])
                served = await sim.converge(fail=failing)
                assert {k for k, v in served.items() if v == (2, False)} == want
                status = await op.advance(60)

                # errorRate > 5 % with enough devices reporting: the gate fails before the bake ends: rollback.
                assert status.rollout.phase == RolloutPhase.ROLLED_BACK  # type: ignore[union-attr]
                assert status.phase == Phase.ROLLED_BACK
                full = status.rollout.stages[2]  # type: ignore[union-attr]
                assert full.phase == "Failed" and full.error_rate is not None and full.error_rate > 0.05
                served = await sim.converge()
                assert {k for k, v in served.items() if v is not None} == want
                assert all(v == (1, True) for v in served.values() if v is not None)  # every device back on v1
                status = await op.advance(60)
                health = (await client2.get_release_status(RELEASE)).health or {}
                assert health["action"] == "rollback" and health["onStable"] == len(want)
                reasons = [e.reason for e in op.events]
                for reason in ("RolloutStarted", "StagePassed", "RolledBack", "PhaseRolledBack"):
                    assert reason in reasons
    finally:
        await running.stop(grace=0.2)
