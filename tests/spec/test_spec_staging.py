"""The rollout document (tether.spec.staging) and per-run resources (tether.spec.resources)."""

from __future__ import annotations

from typing import Any

import pytest

from tether.common import errors
from tether.spec import resources, staging

DOC: dict[str, Any] = {
    "version": 3,
    "salt": "ml/digits",
    "stage": 1,
    "action": "progress",
    "stages": [{"cohort": {"deviceIds": ["b", "a"]}}, {"percent": 10}, {"count": 500}, {"percent": 100}],
}


def test_a_document_parses_into_frozen_values_and_back() -> None:
    ro = staging.parse_rollout(DOC)
    assert ro is not None and ro.action is staging.Action.PROGRESS
    assert ro.stages[0].cohort is not None and ro.stages[0].cohort.device_ids == {"a", "b"}
    assert ro.to_json() == {**DOC, "stages": [{"cohort": {"deviceIds": ["a", "b"]}}, *DOC["stages"][1:]]}
    assert staging.parse_rollout(ro.to_json()) == ro
    with pytest.raises(AttributeError):
        ro.stage = 2  # type: ignore[misc]


def test_empty_means_no_staging_and_another_version_starts_at_stage_0() -> None:
    assert staging.parse_rollout({}) is None and staging.parse_rollout(None) is None
    ro = staging.parse_rollout(DOC)
    assert ro is not None
    assert ro.for_version(4).stage == 0 and ro.for_version(4).stages_hash == ro.stages_hash


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"action": "yolo"}, "rollout.action"),
        ({"stage": 9}, "rollout.stage"),
        ({"salt": ""}, "rollout.salt"),
        ({"stages": [{"percent": 10, "count": 5}]}, "rollout.stages[0]"),
        ({"stages": [{"cohort": {"matchLabels": {"a": 1}}}]}, "rollout.stages[0].cohort.matchLabels['a']"),
        ({"gates": []}, "rollout"),
    ],
)
def test_bad_documents_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(errors.InvalidSpec) as info:
        staging.parse_rollout({**DOC, "stage": 0, **change})
    assert info.value.field == field


def test_resources_keep_only_what_is_set() -> None:
    value = resources.parse_resources({"memoryMB": 64, "timeoutSeconds": 30})
    assert value == resources.Resources(memory_mb=64, timeout_seconds=30)
    assert value.to_json() == {"timeoutSeconds": 30, "memoryMB": 64}
    assert resources.parse_resources(None).to_json() == {}


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"gpuCount": 1}, "resources.gpuCount"),
        ({"cpuSeconds": "10"}, "resources.cpuSeconds"),
        ({"memoryMB": 8}, "resources.memoryMB"),
    ],
)
def test_bad_resources_name_the_key(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(errors.InvalidSpec) as info:
        resources.parse_resources(doc)
    assert info.value.field == field
