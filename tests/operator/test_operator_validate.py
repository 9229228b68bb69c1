"""MLTask spec validation: the schema's rules and the cross-field ones, with the field named."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tether.common import errors
from tether.operator import model, validate
from tether.spec import selectors

DIGEST = "sha256:" + "ab" * 32


def spec(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "bundle": {"digest": DIGEST},
        "trigger": {"type": "onInstall"},
        "target": {
            "matchLabels": {"os": "android"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["mid", "high"]}],
        },
        "rollout": {"stages": [{"percent": 10}, {"percent": 50}, {"percent": 100}]},
        "aggregation": {"tensors": "weightedMean", "metrics": "mean", "counts": "sum"},
        "resources": {"timeoutSeconds": 60, "memoryMB": 256, "cpuSeconds": 30},
        "paused": False,
    }
    doc.update(copy.deepcopy(changes))
    return doc


def test_a_full_valid_spec_parses_into_the_typed_model() -> None:
    typed = validate.validate(spec())
    assert typed.bundle.digest == DIGEST
    assert [s.percent for s in typed.rollout.stages] == [10, 50, 100]
    assert typed.target.match_expressions[0].operator == selectors.Operator.IN
    assert typed.resources.memory_mb == 256
    assert typed.to_json()["resources"] == {"timeoutSeconds": 60, "memoryMB": 256, "cpuSeconds": 30}


def test_a_minimal_spec_gets_the_defaults() -> None:
    typed = validate.validate({"bundle": {"digest": DIGEST}})
    assert typed.trigger.type == model.TriggerType.ON_INSTALL
    assert [s.percent for s in typed.rollout.stages] == [100]
    assert typed.aggregation.tensors == "weightedMean"
    assert typed.target.match_labels == {} and typed.target.match_expressions == []
    assert typed.paused is False


@pytest.mark.parametrize(
    ("doc", "field", "words"),
    [
        pytest.param(None, "spec", "is required", id="no-spec"),
        pytest.param({}, "spec.bundle", "is required", id="no-bundle"),
        pytest.param(spec(bundle={"digest": "sha256:xyz"}), "spec.bundle.digest", "sha256:<64", id="bad-digest"),
        pytest.param(spec(bundle={"digest": "md5:" + "a" * 64}), "spec.bundle.digest", "sha256:<64", id="algo"),
        pytest.param(spec(bundle={"digest": DIGEST.upper()}), "spec.bundle.digest", "lowercase", id="upper-hex"),
        pytest.param(spec(trigger={"type": "lunar"}), "spec.trigger.type", "must be one of", id="trigger-type"),
        pytest.param(
            spec(trigger={"type": "interval"}), "spec.trigger.intervalSeconds", "is required when", id="no-interval"
        ),
        pytest.param(
            spec(trigger={"type": "onInstall", "intervalSeconds": 5}),
            "spec.trigger.intervalSeconds",
            "only allowed",
            id="interval-on-install",
        ),
        pytest.param(
            spec(trigger={"type": "interval", "intervalSeconds": 0}),
            "spec.trigger.intervalSeconds",
            "at least 1",
            id="interval-zero",
        ),
        pytest.param(
            spec(rollout={"stages": [{"percent": 50}, {"percent": 20}, {"percent": 100}]}),
            "spec.rollout.stages[1].percent",
            "greater than the previous stage's 50",
            id="decreasing",
        ),
        pytest.param(
            spec(rollout={"stages": [{"percent": 50}, {"percent": 50}, {"percent": 100}]}),
            "spec.rollout.stages[1].percent",
            "greater than the previous stage's 50",
            id="repeated",
        ),
        pytest.param(
            spec(rollout={"stages": [{"percent": 10}, {"percent": 60}]}),
            "spec.rollout.stages[1].percent",
            "last stage must reach 100",
            id="last-not-100",
        ),
        pytest.param(
            spec(rollout={"stages": [{"percent": 0}, {"percent": 100}]}),
            "spec.rollout.stages[0].percent",
            "at least 1",
            id="zero-percent",
        ),
        pytest.param(
            spec(rollout={"stages": [{"percent": 101}]}), "spec.rollout.stages[0].percent", "at most 100", id="101"
        ),
        pytest.param(spec(rollout={"stages": []}), "spec.rollout.stages", "at least 1", id="no-stages"),
        pytest.param(
            spec(target={"matchExpressions": [{"key": "os", "operator": "In"}]}),
            "spec.target.matchExpressions[0].values",
            "at least one value",
            id="in-without-values",
        ),
        pytest.param(
            spec(target={"matchExpressions": [{"key": "os", "operator": "Exists", "values": ["a"]}]}),
            "spec.target.matchExpressions[0].values",
            "must be empty",
            id="exists-with-values",
        ),
        pytest.param(
            spec(target={"matchExpressions": [{"key": "os", "operator": "Like", "values": ["a"]}]}),
            "spec.target.matchExpressions[0].operator",
            "must be one of",
            id="bad-operator",
        ),
        pytest.param(
            spec(target={"matchExpressions": [{"key": "-bad key", "operator": "Exists"}]}),
            "spec.target.matchExpressions[0].key",
            "must match the pattern",
            id="bad-key",
        ),
        pytest.param(
            spec(aggregation={"tensors": "median"}), "spec.aggregation.tensors", "must be one of", id="tensors"
        ),
        pytest.param(spec(aggregation={"counts": "mean"}), "spec.aggregation.counts", "must be one of", id="counts"),
        pytest.param(spec(resources={"memoryMB": 1}), "spec.resources.memoryMB", "at least 16", id="memory-too-small"),
        pytest.param(spec(bundle={"digest": DIGEST, "extra": 1}), "spec.bundle.extra", "not a known field", id="x"),
        pytest.param(spec(paused="maybe"), "spec.paused", "valid boolean", id="paused-type"),
    ],
)
def test_invalid_specs_name_the_field(doc: Any, field: str, words: str) -> None:
    with pytest.raises(errors.InvalidSpec) as info:
        validate.validate(doc)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert words in str(info.value)
    assert info.value.code == "INVALID_ARGUMENT"


def test_every_problem_is_reported_not_only_the_first() -> None:
    doc = spec(
        trigger={"type": "interval"},
        rollout={"stages": [{"percent": 50}, {"percent": 40}]},
    )
    with pytest.raises(validate.SpecInvalid) as info:
        validate.validate(doc)
    fields = [i.field for i in info.value.issues]
    assert "spec.trigger.intervalSeconds" in fields
    assert "spec.rollout.stages[1].percent" in fields
    assert all(f in str(info.value) for f in fields)


def test_the_example_message_of_the_brief() -> None:
    with pytest.raises(errors.InvalidSpec) as info:
        validate.validate(spec(rollout={"stages": [{"percent": 50}, {"percent": 20}, {"percent": 100}]}))
    assert str(info.value) == "spec.rollout.stages[1].percent: must be greater than the previous stage's 50, got 20"


@pytest.mark.parametrize(("loc", "path"), [((), "spec"), (("a",), "spec.a"), (("a", 3, "b"), "spec.a[3].b")])
def test_field_path(loc: tuple[Any, ...], path: str) -> None:
    assert validate.field_path(loc) == path
