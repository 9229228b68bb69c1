"""AdminClient turns gRPC failures back into the typed errors the controller raised."""

import grpc
import pytest

from tether.common import admin_client, auth, errors


def rpc_error(code, details, trailing=()):
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details=details)


@pytest.mark.parametrize(
    ("name", "code", "cls"),
    [
        ("DigestMismatch", grpc.StatusCode.INVALID_ARGUMENT, errors.DigestMismatch),
        ("InvalidSpec", grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidSpec),
        ("InvalidManifest", grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidManifest),
        ("FailedPrecondition", grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition),
        ("TooLarge", grpc.StatusCode.RESOURCE_EXHAUSTED, errors.TooLarge),
    ],
)
def test_the_named_error_class_is_restored(name, code, cls):
    err = admin_client.error_from_rpc(rpc_error(code, "the message", [(auth.ERROR_TYPE_METADATA, name)]))
    assert type(err) is cls
    assert str(err) == "the message"


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, errors.NotFound),
        (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.TooLarge),
        (grpc.StatusCode.UNAVAILABLE, admin_client.Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, admin_client.Unavailable),
        (grpc.StatusCode.INTERNAL, errors.TetherError),
    ],
)
def test_otherwise_the_status_code_decides(code, cls):
    err = admin_client.error_from_rpc(rpc_error(code, "why"))
    assert type(err) is cls
    assert "why" in str(err)


def test_unknown_or_hostile_class_names_are_ignored():
    err = admin_client.error_from_rpc(rpc_error(grpc.StatusCode.NOT_FOUND, "x", [(auth.ERROR_TYPE_METADATA, "Path")]))
    assert type(err) is errors.NotFound


async def test_an_unreachable_controller_is_unavailable():
    async with admin_client.AdminClient("127.0.0.1:9", token="whatever-token", timeout_s=2) as client:
        with pytest.raises(admin_client.Unavailable):
            await client.list_releases()
