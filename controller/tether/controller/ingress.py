"""Requests off the wire, bounded and validated, before any work: proto in, domain values (or InvalidArgument) out.

Every check a request gets before the domain sees it is here, in one place,
so the services stay thin and the bounds are visible together. A malformed
request costs no database work: these run before any storage call.

Pure: no I/O (protobuf messages in, values out).
"""

from __future__ import annotations

from collections.abc import Sequence

from tether.common import errors, manifest, url_failures
from tether.controller import devices, uploads
from tether.proto.v1 import tether_pb2 as pb

MAX_SIGNATURE_BYTES = 1024
MAX_KEY_ID_LEN = 256
MAX_STATUS_MESSAGE = 4096
MAX_INSTALLED = 10_000  # Subscribe.installed entries a sync reads (more are ignored: releases a device holds)
MAX_DIGESTS_PER_QUERY = manifest.MAX_FILES

DELIVERY_STATES: dict[int, str] = {
    pb.DELIVERY_STATE_NOTIFIED: "notified",
    pb.DELIVERY_STATE_DOWNLOADING: "downloading",
    pb.DELIVERY_STATE_INSTALLED: "installed",
    pb.DELIVERY_STATE_RUNNING: "running",
    pb.DELIVERY_STATE_SUCCEEDED: "succeeded",
    pb.DELIVERY_STATE_FAILED: "failed",
    pb.DELIVERY_STATE_REFUSED: "refused",
    pb.DELIVERY_STATE_UNINSTALLED: "uninstalled",
}


def digest(value: str) -> str:
    """A well-formed blob digest, or InvalidArgument."""
    try:
        return manifest.check_digest(value)
    except errors.InvalidManifest as e:
        raise errors.InvalidArgument(str(e)) from None


def blob_ranges(ranges: Sequence[pb.BlobRange]) -> list[tuple[str, int]]:
    """A PullBlobs request's (digest, offset) pairs, in order: bounded, well-formed, distinct, non-negative."""
    if not ranges:
        raise errors.InvalidArgument("blobs: name at least one blob")
    if len(ranges) > manifest.MAX_BLOBS_PER_PULL:
        raise errors.InvalidArgument(
            f"blobs: {len(ranges)} named, at most {manifest.MAX_BLOBS_PER_PULL} per call (split into several)"
        )
    out: list[tuple[str, int]] = []
    seen: set[str] = set()
    for i, r in enumerate(ranges):
        try:  # (a digest can only be 71 characters: an error message need not quote more)
            d = manifest.check_digest(r.digest[:80], field=f"blobs[{i}].digest")
        except errors.InvalidManifest as e:
            raise errors.InvalidArgument(str(e)) from None
        if d in seen:
            raise errors.InvalidArgument(f"blobs[{i}].digest: {d} is named twice")
        if r.offset < 0:
            raise errors.InvalidArgument(f"blobs[{i}].offset: must be >= 0, got {r.offset}")
        seen.add(d)
        out.append((d, r.offset))
    return out


def offset(value: int) -> int:
    if value < 0:
        raise errors.InvalidArgument(f"offset: must be >= 0, got {value}")
    return value


def delivery_state(request: pb.ReportStatusRequest) -> str:
    """The reported state's name; refuses unknown states and NUL characters (Postgres text cannot hold them)."""
    state = DELIVERY_STATES.get(request.state)
    if state is None:
        raise errors.InvalidArgument(f"state: {request.state} is not a reportable delivery state")
    if "\x00" in request.message:
        raise errors.InvalidArgument("message: must not contain NUL characters")
    for k, v in sorted(request.device_state.items()):
        if "\x00" in k or "\x00" in v:
            raise errors.InvalidArgument(f"device_state[{errors.excerpt(k)}]: must not contain NUL characters")
    return state


def reported_url_failures(request: pb.ReportStatusRequest) -> dict[str, int]:
    """The report's blob URL failures by reason (known reasons, bounded counts), refused whole otherwise."""
    return url_failures.validate(request.url_failures)


def backend_choices(request: pb.ReportBackendsRequest) -> tuple[devices.BackendChoice, ...]:
    return devices.validate_choices(
        {
            "model_key": c.model_key,
            "candidate": c.candidate,
            "latency_ms": c.latency_ms,
            "release": c.release,
            "model": c.model,
        }
        for c in request.choices
    )


def result(request: pb.UploadResultRequest, *, max_tensor_bytes: int) -> uploads.ResultRecord:
    return uploads.validate_result(
        release=request.release,
        version=request.version,
        idempotency_key=request.idempotency_key,
        sample_count=request.sample_count,
        metrics=dict(request.metrics),
        counts=dict(request.counts),
        tensors=[uploads.TensorIn(name=t.name, shape=list(t.shape), data=t.data) for t in request.tensors],
        duration_s=request.duration_s,
        max_tensor_bytes=max_tensor_bytes,
    )


def manifest_signature(request: pb.PutManifestRequest) -> None:
    if len(request.signature) > MAX_SIGNATURE_BYTES:
        raise errors.InvalidArgument(f"signature: longer than {MAX_SIGNATURE_BYTES} bytes")
    if len(request.key_id) > MAX_KEY_ID_LEN:
        raise errors.InvalidArgument(f"key_id: longer than {MAX_KEY_ID_LEN} characters")
    if request.signature and not request.key_id:
        raise errors.InvalidArgument("key_id: required when a signature is given")


def queried_digests(request: pb.MissingBlobsRequest) -> list[str]:
    if len(request.digests) > MAX_DIGESTS_PER_QUERY:
        raise errors.TooLarge(f"digests: {len(request.digests)} entries; the limit is {MAX_DIGESTS_PER_QUERY}")
    return [digest(d) for d in dict.fromkeys(request.digests)]
