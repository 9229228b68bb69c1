"""Typed errors shared by every component.

Each error maps to one gRPC status code at the edge (see `grpc_code`), so no
bare ValueError crosses a boundary and clients get a precise, stable reason.
"""

from __future__ import annotations


class TetherError(Exception):
    """Base of every error Tether raises on purpose."""

    code = "INTERNAL"  # name of a grpc.StatusCode member


class InvalidArgument(TetherError):
    code = "INVALID_ARGUMENT"


class InvalidManifest(InvalidArgument):
    """A bundle manifest (or a bundle directory) is malformed."""


class InvalidSpec(InvalidArgument):
    """An MLTask spec failed validation. `field` names the offending path."""

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class DigestMismatch(InvalidArgument):
    """Content does not hash to the digest it was announced under."""


class TooLarge(TetherError):
    code = "RESOURCE_EXHAUSTED"


class Busy(TetherError):
    """A limit on work in progress (not on the request's size): retry later, with backoff."""

    code = "RESOURCE_EXHAUSTED"


class NotFound(TetherError):
    code = "NOT_FOUND"


class Unauthenticated(TetherError):
    code = "UNAUTHENTICATED"


class PermissionDenied(TetherError):
    code = "PERMISSION_DENIED"


class FailedPrecondition(TetherError):
    code = "FAILED_PRECONDITION"


class VerificationFailed(TetherError):
    """A bundle failed verification on the device: it is refused, never run."""

    code = "FAILED_PRECONDITION"


class TaskFailed(TetherError):
    """A task raised, crashed, or exceeded its limits."""


# ------------------------------------------------------------------ bounded messages
# An error names what is wrong without quoting megabytes of it. gRPC carries the message in
# `grpc-message` (percent-encoded, up to 3 bytes per byte) under a 16 KiB metadata limit, and
# Kubernetes caps a condition's message at 32 KiB: every edge bounds what it sends with `bounded`,
# and messages quote input with `excerpt`.
MAX_MESSAGE_BYTES = 2048
MAX_EXCERPT_CHARS = 64


def excerpt(value: object, *, limit: int = MAX_EXCERPT_CHARS) -> str:
    """`repr(value)`, or its first `limit` characters and how long it was: for quoting input in a message."""
    if isinstance(value, str | bytes) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} {'characters' if isinstance(value, str) else 'bytes'})"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def bounded(message: str, *, limit: int = MAX_MESSAGE_BYTES) -> str:
    """`message` cut to at most `limit` UTF-8 bytes (on a character boundary), saying it was cut."""
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return message
    note = f" ... [message cut: {len(data)} bytes]"
    head = data[: max(0, limit - len(note))].decode("utf-8", "ignore")
    return head + note
