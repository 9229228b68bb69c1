"""Fuzzing the pure decoders: the manifest decoder and MLTask validation on both sides (issue 14, campaign).

Each fuzzer feeds near-valid and wild inputs (tests/reliability/fuzz_strategies.py)
and checks what every answer must be: a value, or a typed refusal that names
its field and is bounded in size; never another exception. And what an
accepted value must satisfy: a manifest round-trips and can be laid out on
a device; an MLTask the operator accepts is a release the controller
accepts. The suite runs a few hundred examples each; the full campaign runs
with `TETHER_FUZZ_EXAMPLES=100000` (figures in docs/reliability.md).
"""

from __future__ import annotations

import re
from typing import Any

from fuzz_strategies import manifest_bytes, mltask_specs, wire_documents
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rel_helpers import fuzz_examples, fuzz_timeout

from tether.common import errors, manifest
from tether.controller import releases
from tether.operator import progression, reconcile, validate
from tether.spec import wire

MAX_REFUSAL_BYTES = errors.MAX_MESSAGE_BYTES  # what the controller's edge would send without cutting
MAX_NAME_BYTES = 255  # a file name on every filesystem a device uses
# A refusal starts with the field it is about ("files[2].path: ...", "schema: ...") or names the manifest.
FIELD_FIRST = re.compile(r"^(manifest |[A-Za-z_][\w.\-]*(\[[^\]]*\][\w.\-]*)*: )")
FUZZ = settings(
    max_examples=fuzz_examples(300),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def _bounded_and_named(e: errors.TetherError) -> None:
    message = str(e)
    assert len(message.encode()) <= MAX_REFUSAL_BYTES, len(message)
    assert FIELD_FIRST.match(message), message[:200]


@fuzz_timeout()
@FUZZ
@given(data=manifest_bytes())
def test_manifest_decoder(data: bytes) -> None:
    try:
        m = manifest.Manifest.from_bytes(data)
    except errors.InvalidManifest as e:
        _bounded_and_named(e)
        return
    assert manifest.Manifest.from_bytes(m.canonical_bytes()) == m
    manifest.check_paths(f.path for f in m.files)
    for f in m.files:
        assert all(0 < len(part.encode()) <= MAX_NAME_BYTES for part in f.path.split("/")), f.path


def _spec_from_operator(spec: Any) -> Any:
    """The ReleaseSpec message the operator would send for an accepted MLTask."""
    meta = reconcile.Meta(name="t", namespace="ml", generation=1)
    rollout = progression.rollout_document(spec, release=meta.release, state=None)
    ar = reconcile.ApplyRelease.from_spec(spec, meta, rollout=rollout)
    return wire.release_spec(
        release=ar.release,
        generation=ar.generation,
        manifest_digest=ar.manifest_digest,
        target=ar.target,
        trigger=ar.trigger,
        aggregation=ar.aggregation,
        paused=ar.paused,
        resources=ar.resources,
        rollout=ar.rollout,
    )


@fuzz_timeout()
@FUZZ
@given(doc=mltask_specs())
def test_mltask_validation_operator_side(doc: Any) -> None:
    try:
        spec = validate.validate(doc)
    except validate.SpecInvalid as e:
        for issue in e.issues:
            assert issue.field.startswith("spec"), issue
            assert len(issue.message.encode()) <= MAX_REFUSAL_BYTES, issue.field
        return
    # Accepted by the operator: the controller accepts the release it makes (one grammar, two sides).
    releases.spec_from_proto(_spec_from_operator(spec))


@fuzz_timeout()
@FUZZ
@given(
    target=wire_documents(),
    trigger=wire_documents(),
    aggregation=wire_documents(),
    resources=wire_documents(),
    rollout=wire_documents(),
    release=st.sampled_from(["ml/t", "ml/" + "n" * 253, "", "x", "a/b/c"]) | st.text(max_size=20),
)
def test_release_spec_validation_controller_side(
    target: str, trigger: str, aggregation: str, resources: str, rollout: str, release: str
) -> None:
    try:
        releases.parse_spec(
            release=release,
            generation=1,
            manifest_digest=manifest.sha256_digest(b"b"),
            target_json=target,
            trigger_json=trigger,
            aggregation_json=aggregation,
            paused=False,
            resources_json=resources,
            rollout_json=rollout,
        )
    except errors.InvalidArgument as e:
        _bounded_and_named(e)
        if isinstance(e, errors.InvalidSpec):
            assert e.field, str(e)[:200]
