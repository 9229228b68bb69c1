"""The Kopf handlers on the Kubernetes emulator, against a recording fake of the controller."""

from __future__ import annotations

from typing import Any

from operator_helpers import DIGEST, FakeAdmin, mltask, running_operator, wait_for

from tether.devtools.emulator import EmulatedCluster
from tether.operator import reconcile


async def status_of(cluster: EmulatedCluster, name: str) -> dict[str, Any]:
    obj = await cluster.get(None, name)
    return (obj or {}).get("status") or {}


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


async def test_a_valid_task_is_applied_and_its_status_follows_the_controller(cluster: EmulatedCluster) -> None:
    admin = FakeAdmin()
    async with running_operator(cluster, admin):
        await cluster.create(mltask("digits", target={"matchLabels": {"app": "shop"}}))

        async def applied() -> dict[str, Any] | None:
            s = await status_of(cluster, "digits")
            return s if s.get("observedGeneration") == 1 and condition(s, "Applied").get("status") == "True" else None

        status = await wait_for(applied, what="the Applied condition")
        assert status["release"] == "default/digits" and status["version"] == 1
        assert status["phase"] == "Pending" and status["stage"] == "1/1"
        assert [type(c) for c in admin.calls] == [reconcile.ApplyRelease]
        assert admin.calls[0].target_json == '{"matchExpressions":[],"matchLabels":{"app":"shop"}}'  # type: ignore[union-attr]

        admin.counts = {"targeted": 2, "notified": 2, "installed": 2, "succeeded": 2, "results": 2}

        async def succeeded() -> dict[str, Any] | None:
            s = await status_of(cluster, "digits")
            return s if s.get("phase") == "Succeeded" else None

        status = await wait_for(succeeded, what="phase Succeeded from the poll")
        assert (status["targeted"], status["succeeded"]) == (2, 2)
        assert condition(status, "Complete")["reason"] == "AllSucceeded"
        events = await cluster.events_for(None, "digits")
        reasons = [(e["type"], e["reason"]) for e in events]
        assert ("Normal", "ReleaseApplied") in reasons and ("Normal", "PhaseSucceeded") in reasons
        assert all(e["source"]["component"] == "tether-operator" for e in events)

    # Later polls changed nothing, so nothing more was applied.
    assert len(admin.calls) == 1


async def test_an_invalid_task_gets_phase_invalid_a_warning_and_nothing_is_sent(cluster: EmulatedCluster) -> None:
    admin = FakeAdmin()
    async with running_operator(cluster, admin):
        await cluster.create(mltask("bad", rollout={"stages": [{"percent": 50}, {"percent": 20}, {"percent": 100}]}))

        async def invalid() -> dict[str, Any] | None:
            s = await status_of(cluster, "bad")
            return s if s.get("phase") == "Invalid" else None

        status = await wait_for(invalid, what="phase Invalid")
        assert condition(status, "Valid")["message"].startswith("spec.rollout.stages[1].percent: must be greater")

        async def warned() -> list[dict[str, Any]]:
            return [
                e
                for e in await cluster.events_for(None, "bad")
                if e["type"] == "Warning" and e["reason"] == "InvalidSpec"
            ]

        (event,) = await wait_for(warned, what="a Warning event")
        assert "spec.rollout.stages[1].percent" in event["message"]
        assert event["involvedObject"]["kind"] == "MLTask"

        await cluster.delete(None, "bad")
        await wait_for(lambda: _gone(cluster, "bad"), what="deletion")
    assert admin.calls == []


async def _gone(cluster: EmulatedCluster, name: str) -> bool:
    return await cluster.get(None, name) is None


async def test_a_spec_change_reapplies_and_delete_removes_the_release(cluster: EmulatedCluster) -> None:
    admin = FakeAdmin()
    async with running_operator(cluster, admin):
        await cluster.create(mltask("t"))
        await wait_for(lambda: _observed(cluster, "t", 1), what="generation 1")
        await cluster.patch(None, "t", {"spec": {"paused": True, "bundle": {"digest": "sha256:" + "1" * 64}}})
        status = await wait_for(lambda: _observed(cluster, "t", 2), what="generation 2")
        assert status["version"] == 2 and status["manifestDigest"] == "sha256:" + "1" * 64
        assert condition(status, "Paused")["status"] == "True"
        applied = [c.generation for c in admin.calls if isinstance(c, reconcile.ApplyRelease)]
        # Each generation applied, in order; a reconcile that runs again before its status is seen (the poll
        # timer on a loaded machine) re-applies the same generation, which ApplyRelease answers unchanged.
        assert [g for i, g in enumerate(applied) if i == 0 or applied[i - 1] != g] == [1, 2]

        await cluster.delete(None, "t")
        await wait_for(lambda: _gone(cluster, "t"), what="deletion")
    assert admin.calls[-1] == reconcile.DeleteRelease(release="default/t")
    assert admin.specs == {}


async def _observed(cluster: EmulatedCluster, name: str, generation: int) -> dict[str, Any] | None:
    s = await status_of(cluster, name)
    return s if s.get("observedGeneration") == generation and condition(s, "Applied").get("status") == "True" else None


async def test_an_unreachable_controller_is_reported_and_retried(cluster: EmulatedCluster) -> None:
    admin = FakeAdmin()
    admin.unavailable = True
    async with running_operator(cluster, admin):
        await cluster.create(mltask("t"))

        async def unavailable() -> dict[str, Any] | None:
            s = await status_of(cluster, "t")
            return s if condition(s, "Applied").get("reason") == "ControllerUnavailable" else None

        status = await wait_for(unavailable, what="ControllerUnavailable")
        assert status["phase"] == "Pending"
        admin.unavailable = False
        status = await wait_for(lambda: _observed(cluster, "t", 1), what="a retried apply")
        assert status["phase"] == "Pending" and status["release"] == "default/t"


async def test_the_emulator_keeps_kubernetes_metadata_semantics(cluster: EmulatedCluster) -> None:
    created = await cluster.create(mltask("m"))
    meta = created["metadata"]
    assert meta["generation"] == 1 and meta["uid"] and meta["creationTimestamp"] and meta["namespace"] == "default"
    rv = meta["resourceVersion"]
    labelled = await cluster.patch(None, "m", {"metadata": {"labels": {"a": "b"}}})
    assert labelled["metadata"]["generation"] == 1 and labelled["metadata"]["resourceVersion"] != rv
    same = await cluster.patch(None, "m", {"spec": {"bundle": {"digest": DIGEST}}})
    assert same["metadata"]["generation"] == 1
    changed = await cluster.patch(None, "m", {"spec": {"paused": True}})
    assert changed["metadata"]["generation"] == 2
    status = await cluster.patch(
        None, "m", {"status": {"phase": "Pending"}, "spec": {"paused": False}}, subresource="status"
    )
    assert status["status"] == {"phase": "Pending"} and status["spec"]["paused"] is True
    assert status["metadata"]["generation"] == 2
    event = await cluster.create(
        {"apiVersion": "v1", "kind": "Event", "metadata": {"generateName": "x-"}, "involvedObject": {"name": "m"}},
        plural="events",
    )
    assert event["metadata"]["name"].startswith("x-") and len(event["metadata"]["name"]) == 7
