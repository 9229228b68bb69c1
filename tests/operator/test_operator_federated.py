"""`spec.federated` in the MLTask: the CRD's schema and the shared parser's rules, with the field named."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import yaml

from tether.common import errors
from tether.operator import crd, validate
from tether.spec import federation, strategies

DIGEST = "sha256:" + "ab" * 32
FEDERATED = {
    "rounds": 30,
    "participants": {"count": 10},
    "quorum": {"count": 8},
    "seed": 0,
    "strategy": {"name": "fedYogi", "serverLearningRate": 0.01},
    "privacy": {"mode": "central", "clipNorm": 1.0, "noiseMultiplier": 0.8},
    "evaluation": {"metric": "accuracy", "server": {"file": "cloud/heldout.npz", "model": "cloud/model.onnx"}},
    "stopOn": {"metric": "accuracy", "target": 0.9},
}


def spec(federated: Any) -> dict[str, Any]:
    return {"bundle": {"digest": DIGEST}, "trigger": {"type": "onDemand"}, "federated": federated}


def test_a_federated_spec_validates_into_the_shared_typed_value() -> None:
    typed = validate.validate(spec(FEDERATED))
    assert typed.federated is not None
    parsed = typed.federated.parsed()
    assert parsed.strategy == strategies.FedOpt(optimizer=strategies.ServerOptimizer.YOGI, server_learning_rate=0.01)
    assert parsed.quorum == federation.Share(count=8)
    assert parsed.privacy is not None and parsed.privacy.noise_multiplier == 0.8
    assert parsed == federation.parse_federation(typed.federated.document())  # the controller reads the same


def test_a_plain_task_has_no_federated_part() -> None:
    typed = validate.validate({"bundle": {"digest": DIGEST}})
    assert typed.federated is None and "federated" not in typed.to_json()


@pytest.mark.parametrize(
    ("federated", "field", "words"),
    [
        # the CRD's schema
        ({**FEDERATED, "participants": {"count": 0}}, "spec.federated.participants.count", "at least 1"),
        ({**FEDERATED, "participants": None}, "spec.federated.participants", ""),
        ({**FEDERATED, "strategy": {"name": "fedSgd"}}, "spec.federated.strategy.name", "fedSgd"),
        ({**FEDERATED, "rounds": 0}, "spec.federated.rounds", "at least 1"),
        ({**FEDERATED, "epochs": 1}, "spec.federated.epochs", "not a known field"),
        ({**FEDERATED, "lateUpdates": "fold"}, "spec.federated.lateUpdates", "'fold'"),
        # the shared parser's rules across fields
        ({**FEDERATED, "quorum": {"count": 11}}, "spec.federated.quorum.count", "only 10 participants"),
        ({**FEDERATED, "participants": {}}, "spec.federated.participants", "exactly one of count and fraction"),
        (
            {**FEDERATED, "strategy": {"name": "fedAvg", "momentum": 0.5}},
            "spec.federated.strategy.momentum",
            "not a parameter of fedAvg",
        ),
        (
            {**FEDERATED, "strategy": {"name": "trimmedMean"}},
            "spec.federated.privacy.mode",
            "trimmedMean is not a mean",
        ),
        ({**FEDERATED, "stopOn": {"metric": "loss", "target": 0.1}}, "spec.federated.stopOn.metric", "'loss'"),
        ({k: v for k, v in FEDERATED.items() if k not in ("rounds", "stopOn")}, "spec.federated.rounds", "required"),
    ],
)
def test_a_bad_federated_spec_names_the_field(federated, field, words) -> None:
    with pytest.raises(errors.InvalidSpec) as e:
        validate.validate(spec(federated))
    fields = [i.field for i in e.value.issues]
    assert field in fields, fields
    assert words in str(e.value)


def test_the_committed_crd_carries_the_federated_schema() -> None:
    doc = yaml.safe_load(pathlib.Path(crd.default_path()).read_text())
    version = doc["spec"]["versions"][0]
    fed = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["federated"]
    assert fed["required"] == ["participants"]
    assert set(fed["properties"]["strategy"]["properties"]["name"]["enum"]) == {
        s.value for s in strategies.StrategyName
    }
    assert fed["properties"]["privacy"]["properties"]["mode"]["enum"] == ["central", "local"]


def test_apply_release_carries_spec_federated_to_the_controller() -> None:
    from tether.operator import reconcile
    from tether.spec import wire

    typed = validate.validate(spec({**FEDERATED, "updateEncoding": "int8", "modelFile": "w/global.safetensors"}))
    action = reconcile.ApplyRelease.from_spec(typed, reconcile.Meta(name="t", namespace="ml", generation=1))
    assert action.federated["updateEncoding"] == "int8" and action.federated["modelFile"] == "w/global.safetensors"
    message = wire.release_spec(release=action.release, manifest_digest=DIGEST, federated=action.federated)
    parsed = federation.parse_federation(wire.parse_object(message.federated_json, field="federated"))
    assert parsed is not None and parsed.update_encoding is federation.UpdateEncoding.INT8
    plain = reconcile.ApplyRelease.from_spec(
        validate.validate({"bundle": {"digest": DIGEST}}), reconcile.Meta(name="t", namespace="ml", generation=1)
    )
    assert plain.federated == {}
    assert wire.release_spec(release="ml/t", manifest_digest=DIGEST).federated_json == ""


def test_the_task_status_shows_the_current_round() -> None:
    from tether.operator import reconcile, task_status

    doc = {
        "round": 3,
        "phase": "Collecting",
        "selected": 10,
        "received": 4,
        "refused": {"NotSelected": 2, "InvalidUpdate": 1},
        "epsilon": 1.5,
        "history": [
            {"round": 1, "phase": "Published", "metrics": {"accuracy": 0.5}, "value": 0.55},
            {"round": 2, "phase": "Published", "metrics": {"accuracy": 0.7}, "value": None},
            {"round": 3, "phase": "Collecting", "metrics": {}},
        ],
        "metric": "accuracy",
        "evaluationError": "federated.evaluation.server.file: 'cloud/x.npz' is not a file of bundle t",
    }
    got = task_status.federated_summary(doc)
    assert got == task_status.FederatedStatus(
        round=3,
        phase="Collecting",
        selected=10,
        received=4,
        refused=3,
        published=2,
        epsilon=1.5,
        metrics={"accuracy": 0.7},
        metric="accuracy",
        value=0.55,  # the latest round that has a value (round 2 was not scored)
        evaluation_error="federated.evaluation.server.file: 'cloud/x.npz' is not a file of bundle t",
    )
    assert task_status.federated_summary(None) is None and task_status.federated_summary({"round": "x"}) is None
    observed = reconcile.Observation(release="ml/t", federated=doc)
    status = reconcile.observe(task_status.MLTaskStatus(), observed)
    assert status.federated == got and status.to_json()["federated"]["round"] == 3
    assert status.to_json()["federated"]["value"] == 0.55
