"""tether.spec.wire: typed values <-> ReleaseSpec messages, and the deprecated JSON fields still read."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tether.common import errors
from tether.controller import releases
from tether.proto.v1 import tether_pb2 as pb
from tether.spec import resources, selectors, staging, wire

DIGEST = "sha256:" + "0" * 64
TARGET_DOC: dict[str, Any] = {
    "matchLabels": {"os": "android"},
    "matchExpressions": [
        {"key": "tier", "operator": "In", "values": ["mid", "high"]},
        {"key": "beta", "operator": "Exists"},
    ],
    "matchVersions": {"appVersion": ">=10.2,<11"},
    "deviceIds": ["d2", "d1"],
    "exclude": [{"matchLabels": {"region": "cn"}}, {"deviceIds": ["d9"]}],
}
ROLLOUT_DOC: dict[str, Any] = {
    "version": 2,
    "salt": "ml/t",
    "stage": 1,
    "action": "complete",
    "stages": [
        {"cohort": {"matchExpressions": [{"key": "beta", "operator": "Exists"}]}},
        {"count": 5},
        {"percent": 100},
    ],
}


def test_a_target_survives_the_message() -> None:
    target = selectors.parse_target(TARGET_DOC)
    message = wire.selector_to_proto(target)
    again = wire.target_from_proto(pb.Selector.FromString(message.SerializeToString()))
    assert again == target and again.document == target.document


def test_a_rollout_document_and_resources_survive_their_messages() -> None:
    ro = staging.parse_rollout(ROLLOUT_DOC)
    assert ro is not None
    assert wire.rollout_from_proto(pb.RolloutDocument.FromString(wire.rollout_to_proto(ro).SerializeToString())) == ro
    for value in (resources.Resources(), resources.Resources(memory_mb=64, cpu_seconds=3)):
        assert wire.resources_from_proto(wire.resources_to_proto(value)) == value


def test_a_bad_message_is_refused_like_the_same_json() -> None:
    message = pb.Selector(match_expressions=[pb.LabelRequirement(key="os", operator="Near", values=["x"])])
    with pytest.raises(errors.InvalidSpec) as typed:
        wire.target_from_proto(message)
    with pytest.raises(errors.InvalidSpec) as text:
        wire.target_from_json(json.dumps({"matchExpressions": [{"key": "os", "operator": "Near", "values": ["x"]}]}))
    assert typed.value.field == text.value.field == "target.matchExpressions[0].operator"
    assert str(typed.value) == str(text.value)
    with pytest.raises(errors.InvalidSpec) as info:
        wire.resources_from_proto(pb.Resources(memory_mb=1 << 40))
    assert info.value.field == "resources.memoryMB"


def typed_spec(**overrides: Any) -> pb.ReleaseSpec:
    values: dict[str, Any] = {
        "release": "ml/t",
        "generation": 3,
        "manifest_digest": DIGEST,
        "target": selectors.parse_target(TARGET_DOC),
        "trigger": {"type": "interval", "seconds": 60},
        "aggregation": {"tensors": "sum"},
        "resources": resources.Resources(timeout_seconds=30, memory_mb=128),
        "rollout": staging.parse_rollout(ROLLOUT_DOC),
    }
    values.update(overrides)
    return wire.release_spec(**values)


def test_typed_values_fill_the_typed_fields_and_the_deprecated_ones() -> None:
    message = typed_spec()
    assert message.HasField("target") and message.HasField("resources") and message.HasField("rollout")
    assert json.loads(message.resources_json) == {"timeoutSeconds": 30, "memoryMB": 128}
    assert selectors.parse_target(json.loads(message.target_json)) == wire.target_of(message)
    assert staging.parse_rollout(json.loads(message.rollout_json)) == wire.rollout_of(message)
    lean = typed_spec(legacy_json=False)
    assert (lean.target_json, lean.resources_json, lean.rollout_json) == ("", "", "")


def test_documents_travel_as_json_only() -> None:
    message = wire.release_spec(release="ml/t", manifest_digest=DIGEST, target=TARGET_DOC, resources={"memoryMB": 64})
    assert not message.HasField("target") and not message.HasField("resources") and not message.HasField("rollout")
    assert json.loads(message.target_json) == TARGET_DOC and message.rollout_json == ""


def test_the_controller_reads_both_wire_forms_alike() -> None:
    typed = releases.spec_from_proto(typed_spec(legacy_json=False))
    legacy = releases.parse_spec(
        release="ml/t",
        generation=3,
        manifest_digest=DIGEST,
        target_json=json.dumps(TARGET_DOC),
        trigger_json=json.dumps({"type": "interval", "seconds": 60}),
        aggregation_json=json.dumps({"tensors": "sum"}),
        paused=False,
        resources_json=json.dumps({"timeoutSeconds": 30, "memoryMB": 128}),
        rollout_json=json.dumps(ROLLOUT_DOC),
    )
    assert typed == legacy
    assert not releases.content_changed(typed, legacy)


def test_the_controller_prefers_the_typed_field() -> None:
    message = typed_spec(legacy_json=False)
    message.target_json = json.dumps({"matchLabels": {"os": "ios"}})
    message.resources_json = "not json"
    message.rollout_json = json.dumps({"nonsense": 1})
    spec = releases.spec_from_proto(message)
    assert spec.target["matchLabels"] == {"os": "android"} and spec.resources == {"timeoutSeconds": 30, "memoryMB": 128}
    assert spec.rollout["action"] == "complete"


def test_an_empty_typed_target_means_every_device_even_beside_old_json() -> None:
    message = typed_spec(target=selectors.Target(), legacy_json=False)
    message.target_json = json.dumps({"matchLabels": {"os": "ios"}})
    assert message.HasField("target") and releases.spec_from_proto(message).target == {}


def test_typed_refusals_name_the_same_fields_as_json_ones() -> None:
    message = typed_spec(legacy_json=False)
    message.rollout.stage = 7
    with pytest.raises(errors.InvalidSpec) as info:
        releases.spec_from_proto(message)
    assert info.value.field == "rollout.stage"
    message = typed_spec(legacy_json=False)
    message.target.match_labels["bad key"] = "x"
    with pytest.raises(errors.InvalidSpec) as info:
        releases.spec_from_proto(message)
    assert info.value.field == "target.matchLabels['bad key']"
