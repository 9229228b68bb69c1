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
