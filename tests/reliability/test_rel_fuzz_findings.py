"""What the fuzzers found, each fixed at its root (docs/reliability.md lists them). Each test fails on the old code.

1. JSON nested a few thousand levels deep made `json.loads` raise RecursionError, which no decoder of
   untrusted JSON caught: the manifest decoder (PutManifest, the agent's verification), the controller's
   ReleaseSpec documents, the agent's trigger, RunNow payload and local event parsers. All now decode
   through `tether.spec.jsontext.loads`, which turns it into the ValueError every caller handles.
2. An integer of more than 4300 digits made the manifest decoder raise a bare ValueError.
4. An unknown resources key was put into the field path as it came (`resources.:`, or a 60 KB key quoted
   whole): now quoted and bounded (`resources[':']`), plain names kept as they were (`resources.gpus`).
5. (RPC fuzzer) ReportStatus with a NUL in `device_state` was refused as "message and device_state must not
   contain NUL characters", naming no one field: now `device_state['k']: ...` or `message: ...`.
6. (RPC fuzzer) PutBlob whose bytes do not hash to its digest was refused as "content hashes to ...":
   now `digest: the content hashes to ...` (both blob stores).
7. (RPC fuzzer) ReportBackends with a NUL in `fingerprint` (or in a choice's release or model) reached
   Postgres, which cannot store NUL, and was answered INTERNAL: now INVALID_ARGUMENT naming the field,
   nothing stored.
3. A manifest whose `engines` is a number, or whose engine name is a list, made the decoder raise TypeError.
"""

from __future__ import annotations

import pytest

from tether.agent import participation
from tether.common import errors, manifest
from tether.spec import jsontext, triggers, wire

DEEP = "[" * 50_000 + "]" * 50_000


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (DEEP.encode(), "nested too deeply"),
        (b'{"schema":' + b"9" * 5000 + b"}", "not valid UTF-8 JSON"),
        (b"\xff\xfe", "not valid UTF-8 JSON"),
    ],
    ids=["deep", "huge integer", "not utf-8"],
)
def test_the_manifest_decoder_refuses_what_json_cannot_decode(data: bytes, words: str) -> None:
    with pytest.raises(errors.InvalidManifest) as info:
        manifest.Manifest.from_bytes(data)
    assert words in str(info.value) and len(str(info.value)) < 400


def test_a_manifest_whose_engines_is_not_a_list_is_refused_naming_the_field() -> None:
    good = manifest.Manifest(
        name="t", entrypoint="task.py", files=(manifest.FileEntry("task.py", manifest.sha256_digest(b""), 0),)
    ).to_json()
    with pytest.raises(errors.InvalidManifest, match=r"^engines: must be a list"):
        manifest.Manifest.from_json({**good, "engines": 5})
    with pytest.raises(errors.InvalidManifest, match=r"^engines\[0\]\.engine: \[\] not in"):
        manifest.Manifest.from_json({**good, "engines": [{"engine": [], "model": "task.py"}]})


def test_release_documents_nested_too_deeply_are_refused_naming_the_field() -> None:
    with pytest.raises(errors.InvalidSpec) as info:
        wire.parse_object("[" * 5000 + "]" * 5000, field="target")  # 10 KB: within the document limit
    assert info.value.field == "target" and "nested too deeply" in str(info.value)
    with pytest.raises(errors.InvalidSpec) as info:
        triggers.Trigger.from_json("[" * 5000 + "]" * 5000)
    assert info.value.field == "trigger"


def test_the_agent_ignores_deep_trigger_documents_where_it_reads_conditions() -> None:
    assert participation.conditions_of("[" * 5000 + "]" * 5000) == {}


def test_jsontext_decodes_what_json_decodes() -> None:
    assert jsontext.loads('{"a": [1, 2.5, null]}') == {"a": [1, 2.5, None]}
    with pytest.raises(ValueError, match="nested too deeply"):
        jsontext.loads(DEEP)


def test_odd_resource_keys_are_quoted_and_bounded_in_the_field() -> None:
    from tether.spec import resources

    for key, field in [(":", "resources[':']"), ("gpus", "resources.gpus"), ("k" * 60_000, None)]:
        with pytest.raises(errors.InvalidSpec) as info:
            resources.parse_resources({key: 1})
        assert info.value.field == field if field else len(info.value.field) < 120


def test_a_nul_in_a_report_names_the_field_it_is_in() -> None:
    from tether.controller import ingress
    from tether.proto.v1 import tether_pb2 as pb

    state = pb.DeliveryState.DELIVERY_STATE_INSTALLED
    with pytest.raises(errors.InvalidArgument, match=r"^device_state\['charging'\]: must not contain NUL"):
        ingress.delivery_state(pb.ReportStatusRequest(state=state, device_state={"charging": "\x00"}))
    with pytest.raises(errors.InvalidArgument, match=r"^message: must not contain NUL"):
        ingress.delivery_state(pb.ReportStatusRequest(state=state, message="a\x00"))


def test_a_blob_that_does_not_match_its_digest_names_the_field(tmp_path) -> None:
    from tether.controller import blobs

    store = blobs.FilesystemBlobStore(tmp_path)
    with pytest.raises(errors.DigestMismatch, match=r"^digest: the content hashes to sha256:"):
        store.put_stream(manifest.sha256_digest(b"a"), iter([b"b"]))


def test_report_backends_refuses_nul_naming_the_field() -> None:
    from tether.controller import devices

    with pytest.raises(errors.InvalidArgument, match=r"^fingerprint: must not contain NUL"):
        devices.validate_fingerprint("cpu\x00")
    choice = {"model_key": manifest.sha256_digest(b"m"), "candidate": "mnn/cpu/t1/high", "latency_ms": 1.0}
    with pytest.raises(errors.InvalidArgument, match=r"^choices\[0\]\.model: must not contain NUL"):
        devices.validate_choices([{**choice, "release": "ns/t", "model": "m\x00"}])
    assert devices.validate_fingerprint("f" * 500) == "f" * devices.MAX_FINGERPRINT_CHARS
