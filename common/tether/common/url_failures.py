"""Why a blob URL did not deliver, as the agent reports it and the controller counts it.

An agent that falls back from a URL (presigned S3 or a signed origin URL) to gRPC `PullBlobs`
says so in its next `ReportStatus` (`url_failures`: reason -> count since its last acknowledged
report), so an expired-URL policy, a broken CDN or a hostile cache shows up on the controller's
`tether_controller_blob_url_failures_total{reason}` instead of only in device logs.
"""

from __future__ import annotations

from collections.abc import Mapping

from tether.common import errors

FORBIDDEN = "forbidden"  # 401 or 403: a forged URL, or one S3 says has expired
EXPIRED = "expired"  # 410: a signed origin URL past its expiry
NOT_FOUND = "not_found"  # 404: the store or cache does not have it
HTTP_STATUS = "http_status"  # any other status that is not 200/206
WRONG_BYTES = "wrong_bytes"  # bytes that do not hash to the digest, or another size than the manifest's
TRUNCATED = "truncated"  # the body ended early, or the connection dropped mid-body
STALLED = "stalled"  # no byte for the stall timeout
CONNECTION = "connection"  # could not connect, TLS failed, a protocol error
REDIRECTS = "redirects"  # a redirect loop (more than the allowed redirects)
BAD_RANGE = "bad_range"  # a 206 for another range than asked, or a 200 that restarts a resumed blob

REASONS = (
    FORBIDDEN,
    EXPIRED,
    NOT_FOUND,
    HTTP_STATUS,
    WRONG_BYTES,
    TRUNCATED,
    STALLED,
    CONNECTION,
    REDIRECTS,
    BAD_RANGE,
)
MAX_COUNT = 1_000_000  # per reason and report


def for_status(status: int) -> str:
    """The reason of an HTTP status that did not deliver the blob."""
    if status in (401, 403):
        return FORBIDDEN
    if status == 410:
        return EXPIRED
    if status == 404:
        return NOT_FOUND
    return HTTP_STATUS


def validate(counts: Mapping[str, int]) -> dict[str, int]:
    """A report's `url_failures`: known reasons only, counts in [0, MAX_COUNT]; zero counts dropped."""
    out: dict[str, int] = {}
    for reason, count in sorted(counts.items()):
        if reason not in REASONS:
            raise errors.InvalidArgument(
                f"url_failures[{errors.excerpt(reason)}]: not a reason; one of {', '.join(REASONS)}"
            )
        if not 0 <= count <= MAX_COUNT:
            raise errors.InvalidArgument(f"url_failures[{reason}]: {count} is outside [0, {MAX_COUNT}]")
        if count:
            out[reason] = count
    return out
