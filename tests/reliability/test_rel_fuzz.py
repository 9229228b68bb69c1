"""Malformed and oversized requests get a clean error status and leave the server (and its data) unaffected.

Hypothesis throws arbitrary bytes at every servicer method through a raw
generic channel (no client-side serializer), with and without valid
credentials, then checks that the answer is a status the API documents
(never UNKNOWN, never a hang), that the server still answers a normal call,
and that no table changed.
"""

from __future__ import annotations

import pathlib

import grpc
import psycopg
import pytest
from controller_support import ADMIN_TOKEN, BOOTSTRAP_TOKEN, controller_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rel_helpers import controller_in_thread

from tether.common import auth
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc

TABLES = ("devices", "blobs", "manifests", "releases", "deliveries", "results", "aggregates")
# RenewCredential is left out: an empty request is a valid renewal (and rotates the credential).
DEVICE_UNARY = ["Enroll", "GetManifest", "ReportStatus", "UploadResult", "GetDesired"]
DEVICE_STREAM = ["Subscribe", "PullBlob", "PullBlobs"]
ADMIN_UNARY = ["MissingBlobs", "PutManifest", "ApplyRelease", "DeleteRelease", "GetReleaseStatus", "ListReleases"]
# What a bad request may be answered with: documented, specific codes (UNKNOWN would be a crash).
CLEAN = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED,
}


def _counts(database_url: str) -> dict[str, int]:
    with psycopg.connect(database_url) as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}  # type: ignore[index]


@pytest.fixture(scope="module")
def served(postgres_server_url, tmp_path_factory):
    """One controller for the module (hypothesis runs many examples against it), with an enrolled device."""
    import uuid

    from psycopg import conninfo, sql

    name = f"tether_fuzz_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = conninfo.conninfo_to_dict(postgres_server_url)
    params["dbname"] = name
    url = conninfo.make_conninfo(**params)
    blob_dir = pathlib.Path(tmp_path_factory.mktemp("fuzz")) / "blobs"
    cfg = controller_config(url, blob_dir, grace_s=0.2, pool_max_size=4, max_message_bytes=1024 * 1024)
    try:
        with controller_in_thread(cfg) as running, grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.DeviceServiceStub(channel)
            enrolled = stub.Enroll(
                pb.EnrollRequest(bootstrap_token=BOOTSTRAP_TOKEN, device=pb.DeviceInfo(device_id="fuzz-phone"))
            )
            yield running, channel, auth.bearer_metadata(enrolled.credential), url
    finally:
        with psycopg.connect(postgres_server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _call(channel: grpc.Channel, service: str, method: str, payload: bytes, metadata) -> grpc.StatusCode:
    path = f"/tether.v1.{service}/{method}"
    try:
        if method in DEVICE_STREAM:
            for _ in channel.unary_stream(path)(payload, metadata=metadata, timeout=5):
                pass  # a Subscribe that got through: the first event (Sync) suffices
                break
        elif method == "PutBlob":
            channel.stream_unary(path)(iter([payload, payload]), metadata=metadata, timeout=5)
        else:
            channel.unary_unary(path)(payload, metadata=metadata, timeout=5)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _healthy(channel: grpc.Channel, device_md) -> None:
    sync = pb_grpc.DeviceServiceStub(channel).GetDesired(pb.GetDesiredRequest(), metadata=device_md, timeout=5)
    assert isinstance(sync, pb.Sync)
    listed = pb_grpc.AdminServiceStub(channel).ListReleases(
        pb.ListReleasesRequest(), metadata=auth.bearer_metadata(ADMIN_TOKEN), timeout=5
    )
    assert isinstance(listed, pb.ListReleasesResponse)


METHODS = [("DeviceService", m) for m in DEVICE_UNARY + DEVICE_STREAM] + [
    ("AdminService", m) for m in [*ADMIN_UNARY, "PutBlob"]
]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    target=st.sampled_from(METHODS),
    payload=st.binary(max_size=512),
    who=st.sampled_from(["none", "device", "admin", "garbage"]),
)
def test_arbitrary_bytes_get_a_clean_status_and_change_nothing(served, target, payload, who):
    _, channel, device_md, url = served
    before = _counts(url)
    metadata = {
        "none": None,
        "device": device_md,
        "admin": auth.bearer_metadata(ADMIN_TOKEN),
        "garbage": (("authorization", "Bearer v1." + payload.hex()[:40]),),
    }[who]
    code = _call(channel, *target, payload, metadata)
    # An empty or field-less message can be a valid request (e.g. GetDesired, ListReleases).
    assert code in CLEAN | {grpc.StatusCode.OK}, (target, code)
    _healthy(channel, device_md)
    after = _counts(url)
    assert after == before


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    release=st.text(max_size=300),
    version=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    state=st.integers(min_value=-5, max_value=20),
    message=st.text(max_size=5000),
    digest=st.text(max_size=100),
    offset=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    blobs=st.lists(
        st.tuples(
            st.one_of(st.text(max_size=80), st.just("sha256:" + "0" * 64)),
            st.integers(min_value=-(2**63), max_value=2**63 - 1),
        ),
        max_size=8,
    ),
)
def test_well_formed_but_wrong_device_requests_are_refused_cleanly(
    served, release, version, state, message, digest, offset, blobs
):
    _, channel, device_md, url = served
    before = _counts(url)
    raw = [
        ("ReportStatus", pb.ReportStatusRequest(release=release, version=version, state=state, message=message)),
        ("GetManifest", pb.GetManifestRequest(release=release, manifest_digest=digest)),
        ("PullBlob", pb.PullBlobRequest(release=release, digest=digest, offset=offset)),
        ("PullBlobs", pb.PullBlobsRequest(release=release, blobs=[pb.BlobRange(digest=d, offset=o) for d, o in blobs])),
    ]
    for method, request in raw:
        code = _call(channel, "DeviceService", method, request.SerializeToString(), device_md)
        assert code in CLEAN, (method, code)
    _healthy(channel, device_md)
    assert _counts(url) == before


def test_oversized_requests_are_refused_and_the_server_carries_on(served):
    _, channel, device_md, url = served
    before = _counts(url)
    tensor = pb.Tensor(data=b"\0" * 2**21)  # 2 MiB: over this server's 1 MiB message limit
    big = pb.UploadResultRequest(release="ns/t", version=1, idempotency_key="k", tensors=[tensor])
    code = _call(channel, "DeviceService", "UploadResult", big.SerializeToString(), device_md)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    too_many = pb.MissingBlobsRequest(digests=["sha256:" + "0" * 64] * 20_000)
    admin_md = auth.bearer_metadata(ADMIN_TOKEN)
    code = _call(channel, "AdminService", "MissingBlobs", too_many.SerializeToString(), admin_md)
    assert code in {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT}
    _healthy(channel, device_md)
    assert _counts(url) == before
