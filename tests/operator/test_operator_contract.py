"""The operator holds typed spec values and hands them to the admin client as they are (encoded once, at the edge)."""

from __future__ import annotations

import datetime
from typing import Any

from tether.common.admin_client import ApplyResult
from tether.operator import reconcile, release_client
from tether.operator.task_status import MLTaskStatus
from tether.spec import resources, selectors, staging, wire

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
DIGEST = "sha256:" + "0" * 64
META = reconcile.Meta(name="t", namespace="ml", generation=1)
SPEC: dict[str, Any] = {
    "bundle": {"digest": DIGEST},
    "target": {"matchLabels": {"os": "android"}, "exclude": [{"deviceIds": ["d9"]}]},
    "rollout": {"stages": [{"cohort": {"matchLabels": {"ring": "beta"}}}, {"percent": 10}, {"percent": 100}]},
    "resources": {"memoryMB": 64},
}


class RecordingClient:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def apply_release(self, **kwargs: Any) -> ApplyResult:
        self.calls.append(kwargs)
        return ApplyResult(release=kwargs["release"], version=1, changed=True)


def test_an_apply_carries_the_shared_spec_types() -> None:
    (action,) = reconcile.decide(spec=SPEC, meta=META, status=MLTaskStatus(), observed=None, now=T0).actions
    assert isinstance(action, reconcile.ApplyRelease)
    assert action.target == selectors.parse_target(SPEC["target"])
    assert action.resources == resources.Resources(timeout_seconds=300, memory_mb=64)
    assert action.rollout is not None and action.rollout.action is staging.Action.PROGRESS
    assert action.rollout.stages[0].cohort == selectors.parse_selector({"matchLabels": {"ring": "beta"}}, field="c")
    assert action.rollout.salt == "ml/t" and action.rollout_json == wire.rollout_json(action.rollout)


async def test_the_release_client_passes_typed_values_to_the_edge() -> None:
    (action,) = reconcile.decide(spec=SPEC, meta=META, status=MLTaskStatus(), observed=None, now=T0).actions
    assert isinstance(action, reconcile.ApplyRelease)
    client = RecordingClient()
    applied = await release_client.ControllerAdmin(client).apply(action)  # type: ignore[arg-type]
    assert applied == reconcile.Applied(version=1, changed=True)
    (call,) = client.calls
    assert (call["target"], call["resources"], call["rollout"]) == (action.target, action.resources, action.rollout)
    message = wire.release_spec(**call)
    assert wire.target_of(message) == action.target and wire.rollout_of(message) == action.rollout
    assert message.HasField("target") and message.HasField("resources") and message.HasField("rollout")
