"""Defect class 3 (issue 14): a refusal names what is wrong without quoting megabytes of it.

Before the fix a large label key came back inside the controller's refusal
(in the field path and again in the message), the message overran gRPC's
16 KiB metadata limit and the caller saw a transport error that named
nothing; and the operator copied a huge field whole into a condition. Now
messages quote input through `errors.excerpt`, and every edge (the
controller's edge interceptor, the operator's conditions) bounds what it
sends with `errors.bounded`. The operator also checks label keys and values
against Kubernetes' rules.
"""

from __future__ import annotations

import datetime
import json

import grpc
import pytest
from controller_support import ADMIN_TOKEN

from tether.common import errors
from tether.operator import conditions, reconcile, validate
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc

HUGE = "k" * 200_000
DIGEST = "sha256:" + "a" * 64
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def _spec(target: dict) -> dict:
    return {"bundle": {"digest": DIGEST}, "target": target}


@pytest.mark.parametrize(
    ("target", "field"),
    [
        ({"matchLabels": {HUGE: "x"}}, "target.matchLabels"),
        ({"matchLabels": {"os": HUGE}}, "target.matchLabels['os']"),
        ({"matchExpressions": [{"key": "os", "operator": HUGE, "values": ["a"]}]}, "target.matchExpressions[0]"),
        ({"matchVersions": {"appVersion": HUGE}}, "target.matchVersions['appVersion']"),
    ],
)
async def test_the_controller_refuses_huge_input_with_a_bounded_message_naming_the_field(channel, target, field):
    stub = pb_grpc.AdminServiceStub(channel)
    spec = pb.ReleaseSpec(release="ns/huge", manifest_digest=DIGEST, target_json=json.dumps(target))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ApplyRelease(
            pb.ApplyReleaseRequest(spec=spec), metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),)
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details()
    assert details.startswith(field)
    assert len(details.encode()) <= errors.MAX_MESSAGE_BYTES
    assert dict(refused.value.trailing_metadata())["tether-error"] == "InvalidSpec"


def test_bounded_cuts_on_a_character_boundary_and_says_so():
    text = "é" * 10_000
    cut = errors.bounded(text, limit=100)
    assert len(cut.encode()) <= 100 and cut.endswith("[message cut: 20000 bytes]")
    assert errors.bounded("short") == "short"
    assert errors.excerpt("ok") == "'ok'"
    assert errors.excerpt("x" * 1000).endswith("... (1000 characters)")


@pytest.mark.parametrize(
    "spec",
    [
        _spec({"matchLabels": {HUGE: "x"}}),
        _spec({"matchLabels": {"os": HUGE}}),
        _spec({"matchVersions": {"appVersion": HUGE}}),
        {"bundle": {"digest": HUGE}},
        {"bundle": {"digest": DIGEST}, "trigger": {"type": "cron", "schedule": HUGE}},
    ],
)
def test_the_operator_names_a_huge_field_in_a_bounded_condition(spec):
    with pytest.raises(validate.SpecInvalid) as invalid:
        validate.validate(spec)
    assert len(str(invalid.value)) < 4096
    conds = conditions.set_condition([], conditions.INVALID_SPEC, now=NOW, error=str(invalid.value) * 50)
    assert len(conds[0].message.encode()) <= conditions.MAX_MESSAGE_BYTES
    assert reconcile.Failed.from_error(errors.InvalidSpec(HUGE)).message.endswith("bytes]")


@pytest.mark.parametrize(
    ("target", "field"),
    [
        ({"matchLabels": {"a" * 64: "x"}}, "spec.target.matchLabels." + "a" * 64),
        ({"matchLabels": {"Example.com/os": "x"}}, "spec.target.matchLabels.Example.com/os"),
        ({"matchLabels": {"os": "Pixel 7"}}, "spec.target.matchLabels.os"),
        ({"matchLabels": {"os": "v" * 64}}, "spec.target.matchLabels.os"),
        ({"matchLabels": {"os": "-android"}}, "spec.target.matchLabels.os"),
        ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["a b"]}]}, None),
        ({"exclude": [{"matchLabels": {"os": "bad value"}}]}, "spec.target.exclude[0].matchLabels.os"),
        ({"matchVersions": {"a" * 64: ">=1"}}, "spec.target.matchVersions." + "a" * 64),
    ],
)
def test_the_operator_checks_label_keys_and_values_against_kubernetes_rules(target, field):
    with pytest.raises(validate.SpecInvalid, match=r"Kubernetes label rules|DNS subdomain|must match") as invalid:
        validate.validate(_spec(target))
    if field is not None:
        assert invalid.value.field == field


def test_valid_labels_and_pseudo_attributes_pass():
    validate.validate(
        _spec(
            {
                "matchLabels": {"example.com/os": "android", "tier": "", "tether.io/backend": "mnn/cpu"},
                "matchExpressions": [
                    {"key": "tether.io/device-id", "operator": "In", "values": ["device with spaces/1"]},
                    {"key": "app", "operator": "In", "values": ["shop", "shop_2.x"]},
                ],
            }
        )
    )
