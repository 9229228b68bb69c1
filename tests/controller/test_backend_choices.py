"""Backend choices a device reports (ReportBackends): validation, and targeting on tether.io/selected-backend."""

from __future__ import annotations

import pytest

from tether.common import errors
from tether.controller import devices
from tether.spec import selectors

KEY = "sha256:" + "a" * 64


def test_valid_choices_and_the_selected_backend_fact() -> None:
    choices = devices.validate_choices(
        [
            {"model_key": KEY, "candidate": "mnn/cpu/t2/high", "latency_ms": 0.5, "release": "ns/a", "model": "m.mnn"},
            {"model_key": KEY, "candidate": "onnxruntime/cuda/t1/fp32", "latency_ms": 3.0},
        ]
    )
    assert [c.backend for c in choices] == ["mnn/cpu", "onnxruntime/cuda"]
    device = devices.Device(
        device_id="d1", attributes={"os": "android"}, backends=("mnn/cpu",), backend_choices=choices
    )
    facts = device.facts
    assert facts[selectors.SELECTED_BACKEND_KEY] == frozenset({"mnn/cpu", "onnxruntime/cuda"})
    target = selectors.parse_target(
        {"matchExpressions": [{"key": "tether.io/selected-backend", "operator": "In", "values": ["onnxruntime/cuda"]}]}
    )
    assert target.matches(facts)
    assert not target.matches(devices.Device(device_id="d2", attributes={}).facts)
    assert devices.BackendChoice.from_json(choices[0].to_json()) == choices[0]


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"model_key": "nope", "candidate": "mnn/cpu/t1/high", "latency_ms": 1.0}, "model_key"),
        ({"model_key": KEY, "candidate": "mnn/cpu/high", "latency_ms": 1.0}, "candidate"),
        ({"model_key": KEY, "candidate": "MNN/cpu/t1/high", "latency_ms": 1.0}, "candidate"),
        ({"model_key": KEY, "candidate": "mnn/cpu/t1/high", "latency_ms": float("nan")}, "latency_ms"),
        ({"model_key": KEY, "candidate": "mnn/cpu/t1/high", "latency_ms": -1.0}, "latency_ms"),
    ],
)
def test_bad_choices_are_refused(doc, match) -> None:
    with pytest.raises(errors.InvalidArgument, match=match):
        devices.validate_choices([doc])


def test_too_many_choices() -> None:
    doc = {"model_key": KEY, "candidate": "mnn/cpu/t1/high", "latency_ms": 1.0}
    with pytest.raises(errors.TooLarge):
        devices.validate_choices([doc] * (devices.MAX_CHOICES + 1))


async def test_report_backends_is_stored_and_bad_reports_change_nothing(devices_stub, pg_storage) -> None:
    import grpc
    from controller_helpers import enroll

    from tether.proto.v1 import tether_pb2 as pb

    md = await enroll(devices_stub, "dev-b", {"os": "android"})
    choice = pb.BackendChoice(model_key=KEY, candidate="onnxruntime/cuda/t1/fp32", latency_ms=1.25, release="ns/t")
    await devices_stub.ReportBackends(
        pb.ReportBackendsRequest(choices=[choice], fingerprint="sha256:dev", backends=["mnn/cpu", "onnxruntime/cuda"]),
        metadata=md,
    )
    (device,) = [d for d in await pg_storage.devices.active_devices() if d.device_id == "dev-b"]
    assert device.backends == ("mnn/cpu", "onnxruntime/cuda")
    assert [(c.candidate, c.latency_ms, c.release) for c in device.backend_choices] == [
        ("onnxruntime/cuda/t1/fp32", 1.25, "ns/t")
    ]
    assert device.facts[selectors.SELECTED_BACKEND_KEY] == frozenset({"onnxruntime/cuda"})

    bad = pb.BackendChoice(model_key=KEY, candidate="not a candidate", latency_ms=1.0)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await devices_stub.ReportBackends(pb.ReportBackendsRequest(choices=[bad]), metadata=md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "candidate" in info.value.details()
    (again,) = [d for d in await pg_storage.devices.active_devices() if d.device_id == "dev-b"]
    assert again.backend_choices == device.backend_choices
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await devices_stub.ReportBackends(pb.ReportBackendsRequest(choices=[choice]))  # no credential
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
