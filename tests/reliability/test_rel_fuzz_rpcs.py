"""Fuzzing every RPC of DeviceService, AdminService and TunnelService with well-formed messages, over real gRPC
(issue 14).

Requests are generated from each method's request descriptor (every field,
nested messages, repeated fields and maps), with strings drawn from values
that reach past the first check (the seeded release's name, its manifest
and blob digests, valid states) mixed with hostile ones, and sent with the
credential the service takes against a real controller on PostgreSQL. For
every answer: a documented status (never UNKNOWN or INTERNAL, never a hang);
a refusal's message bounded (at most `errors.MAX_MESSAGE_BYTES`) and, for
INVALID_ARGUMENT, naming its field first; a refusal changes no stored row;
and the server still answers. A few hundred examples run in the suite;
`TETHER_FUZZ_EXAMPLES=N` runs N (figures in docs/reliability.md).
"""

from __future__ import annotations

import pathlib
import re
import uuid
from typing import Any

import grpc
import psycopg
import pytest
from controller_support import ADMIN_TOKEN, BOOTSTRAP_TOKEN, controller_config, snapshot
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from rel_helpers import controller_in_thread, fuzz_examples, fuzz_timeout
from test_rel_fuzz import CLEAN

from tether.common import auth, errors, manifest
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc
from tether.proto.v1 import tunnel_pb2
from tether.spec import wire

RELEASE = "ns/fuzzed"
TASK = b"def run(ctx):\n    return {}\n"
BLOB = manifest.sha256_digest(TASK)
MANIFEST = manifest.Manifest(name="t", entrypoint="task.py", files=(manifest.FileEntry("task.py", BLOB, len(TASK)),))
# Left out: RenewCredential (an empty request is a valid renewal that rotates the fuzzing device's
# credential) and RevokeDevice of the fuzzing device itself (never drawn: its id is not among the strings).
SKIPPED = {("DeviceService", "RenewCredential")}
# The field first ("spec.target.matchLabels['os']: ..."), or the manifest the whole request is.
FIELD_FIRST = re.compile(r"^(manifest |[A-Za-z_][\w.\-]*(\[[^\]]*\][\w.\-]*)*: )")

STRINGS = st.one_of(
    st.sampled_from(
        [
            "",
            RELEASE,
            "ns/other",
            BLOB,
            MANIFEST.digest,
            "sha256:" + "0" * 64,
            "{}",
            '{"type": "onInstall"}',
            '{"matchLabels": {"os": "android"}}',
            "x" * 5000,
            "\x00",
            "é",
            "../../etc/passwd",
            "Bearer x",
        ]
    ),
    st.text(max_size=40),
)
INTS = st.one_of(st.sampled_from([0, 1, 2, -1, 2**31, 2**62]), st.integers(min_value=-(2**63), max_value=2**63 - 1))


def _scalar(field: Any) -> st.SearchStrategy[Any]:
    from google.protobuf.descriptor import FieldDescriptor as F

    t = field.type
    if t == F.TYPE_STRING:
        return STRINGS
    if t == F.TYPE_BYTES:
        return st.one_of(st.just(TASK), st.binary(max_size=64))
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32 if t == F.TYPE_FLOAT else 64)
    if t == F.TYPE_ENUM:
        return st.integers(min_value=-2, max_value=len(field.enum_type.values) + 1)
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return st.integers(min_value=0, max_value=2**32 - 1)
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return st.integers(min_value=0, max_value=2**64 - 1)
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return st.integers(min_value=-(2**31), max_value=2**31 - 1)
    return INTS


def messages(descriptor: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """A strategy of messages of this type: every field may be set (nested up to three levels)."""
    from google.protobuf import message_factory

    cls = message_factory.GetMessageClass(descriptor)

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        msg = cls()
        for field in descriptor.fields:
            if not draw(st.booleans()):
                continue
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                key_f, value_f = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
                if value_f.message_type is not None:
                    continue
                for k, v in draw(st.dictionaries(_scalar(key_f), _scalar(value_f), max_size=3)).items():
                    getattr(msg, field.name)[k] = v
            elif field.message_type is not None:
                if depth >= 3:
                    continue
                sub = messages(field.message_type, depth + 1)
                if field.is_repeated:
                    getattr(msg, field.name).extend(draw(st.lists(sub, max_size=3)))
                else:
                    getattr(msg, field.name).CopyFrom(draw(sub))
            elif field.is_repeated:
                getattr(msg, field.name).extend(draw(st.lists(_scalar(field), max_size=4)))
            else:
                setattr(msg, field.name, draw(_scalar(field)))
        return msg

    return build()


def _methods() -> list[tuple[str, Any]]:
    out = []
    for service, descriptor in (
        ("DeviceService", pb.DESCRIPTOR),
        ("AdminService", pb.DESCRIPTOR),
        ("TunnelService", tunnel_pb2.DESCRIPTOR),
    ):
        for method in descriptor.services_by_name[service].methods:
            if (service, method.name) not in SKIPPED:
                out.append((service, method))
    return out


METHODS = _methods()


@pytest.fixture(scope="module")
def seeded(postgres_server_url, tmp_path_factory):
    """One controller for the module on its own database, with a device and a release it targets."""
    from psycopg import conninfo, sql

    name = f"tether_rpcfuzz_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = conninfo.conninfo_to_dict(postgres_server_url)
    params["dbname"] = name
    url = conninfo.make_conninfo(**params)
    blob_dir = pathlib.Path(tmp_path_factory.mktemp("rpcfuzz")) / "blobs"
    cfg = controller_config(url, blob_dir, grace_s=0.2, pool_max_size=4, max_message_bytes=1024 * 1024)
    try:
        with controller_in_thread(cfg) as running, grpc.insecure_channel(running.address) as channel:
            device = pb_grpc.DeviceServiceStub(channel).Enroll(
                pb.EnrollRequest(
                    bootstrap_token=BOOTSTRAP_TOKEN,
                    device=pb.DeviceInfo(device_id="rpc-fuzz-phone", attributes={"os": "android"}),
                )
            )
            admin = auth.bearer_metadata(ADMIN_TOKEN)
            stub = pb_grpc.AdminServiceStub(channel)
            stub.PutBlob(iter([pb.PutBlobChunk(digest=BLOB, data=TASK)]), metadata=admin)
            stub.PutManifest(pb.PutManifestRequest(manifest=MANIFEST.canonical_bytes()), metadata=admin)
            yield channel, auth.bearer_metadata(device.credential), admin, url
    finally:
        with psycopg.connect(postgres_server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _ensure_release(channel: grpc.Channel, admin: Any) -> None:
    """The release the strings name, as seeded (a fuzzed DeleteRelease or ApplyRelease may have changed it)."""
    spec = wire.release_spec(
        release=RELEASE, manifest_digest=MANIFEST.digest, target={"matchLabels": {"os": "android"}}
    )
    pb_grpc.AdminServiceStub(channel).ApplyRelease(pb.ApplyReleaseRequest(spec=spec), metadata=admin, timeout=10)


def _call(channel: grpc.Channel, service: str, method: Any, request: Any, metadata: Any) -> tuple[Any, str]:
    path = f"/tether.v1.{service}/{method.name}"
    payload = request.SerializeToString()
    try:
        if method.client_streaming:
            channel.stream_unary(path)(iter([payload, payload]), metadata=metadata, timeout=10)
        elif method.server_streaming:
            for i, _ in enumerate(channel.unary_stream(path)(payload, metadata=metadata, timeout=10)):
                if i >= 3 or method.name == "Subscribe":
                    break  # a stream that got through: its first messages suffice
        else:
            channel.unary_unary(path)(payload, metadata=metadata, timeout=10)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, Any, Any, str]:
    service, method = draw(st.sampled_from(METHODS))
    request = draw(messages(method.input_type))
    who = draw(st.sampled_from(["own", "own", "own", "other", "none"]))
    return service, method, request, who


@fuzz_timeout()
@settings(
    max_examples=fuzz_examples(150),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(call=calls())
def test_every_rpc_with_well_formed_requests(seeded, call) -> None:
    channel, device_md, admin_md, url = seeded
    service, method, request, who = call
    _ensure_release(channel, admin_md)
    own, other = (device_md, admin_md) if service != "AdminService" else (admin_md, device_md)
    metadata = {"own": own, "other": other, "none": None}[who]
    before = snapshot(url)
    code, details = _call(channel, service, method, request, metadata)
    event(f"{method.name}: {code.name}")  # --hypothesis-show-statistics shows how far requests got
    assert code in CLEAN | {grpc.StatusCode.OK}, (method.name, code, details[:300])
    if code != grpc.StatusCode.OK:
        assert len(details.encode()) <= errors.MAX_MESSAGE_BYTES, (method.name, len(details))
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert FIELD_FIRST.match(details), (method.name, details[:300])
        assert snapshot(url) == before, (method.name, code, details[:300])
    # Still serving.
    pb_grpc.DeviceServiceStub(channel).GetDesired(pb.GetDesiredRequest(), metadata=device_md, timeout=10)
