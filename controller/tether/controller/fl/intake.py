"""What the controller decides about an incoming update before and after reading its bytes.

An update arrives as a header (release, round, version, weight, metrics,
encoding, size, digest) and bytes (`DeviceService.PushUpdate`). In order:

1. `parse_header` bounds the header (sizes, names, finite metrics);
2. the round's rules judge the device (`rounds.admit` on the stored round):
   an update from a device that was not selected, for a closed round, or sent
   twice is refused *before* its bytes are read;
3. `check_bytes` holds the bytes to the header's size and digest;
4. `decode` reads the tensors in the promised encoding and checks them
   against the round's global model (`updates.check`: names, shapes, dtype,
   finite values).

Each refusal is an error whose `reason` is counted on the round and whose
message starts with it (`BadDigest: ...`), so the device and status say the
same. Pure: hashlib, numpy and safetensors (through `tensorfiles`), no I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Mapping
from typing import Any

from tether.common import errors, tensorfiles
from tether.controller.fl import updates

DEFAULT_MAX_UPDATE_BYTES = 256 * 1024 * 1024
MAX_METRICS = 256
METRIC_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:/-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class Refused(errors.TetherError):
    """An update refused for its content; `reason` is what status counts."""

    reason = "InvalidUpdate"
    code = "INVALID_ARGUMENT"

    def __init__(self, message: str) -> None:
        super().__init__(f"{self.reason}: {message}")


class TooLarge(Refused):
    reason = "TooLarge"


class BadDigest(Refused):
    reason = "BadDigest"


class InvalidUpdate(Refused):
    reason = "InvalidUpdate"


class StaleModel(Refused):
    """Trained from another bundle version than the round's global model."""

    reason = "StaleModel"


def check_version(header: Header, *, round_version: int) -> None:
    if header.version != round_version:
        raise StaleModel(f"trained from version {header.version}; round {header.round} trains from {round_version}")


class NotAdmitted(errors.FailedPrecondition):
    """An update the round's rules refuse (NotSelected, Duplicate, NotOpenYet, RoundClosed)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclasses.dataclass(frozen=True, kw_only=True)
class Header:
    release: str
    round: int
    version: int
    samples: int
    metrics: Mapping[str, float]
    encoding: str
    size: int
    digest: str


def parse_header(
    *,
    release: str,
    round_number: int,
    version: int,
    sample_count: int,
    metrics: Mapping[str, float],
    encoding: str,
    size: int,
    digest: str,
    max_bytes: int = DEFAULT_MAX_UPDATE_BYTES,
) -> Header:
    """The header as checked values; `InvalidArgument` naming the field, `TooLarge` for the size."""
    if round_number < 1:
        raise errors.InvalidArgument(f"round: must be at least 1, got {round_number}")
    if version < 0:
        raise errors.InvalidArgument(f"version: must be at least 0, got {version}")
    if sample_count < 1:
        raise errors.InvalidArgument(f"sample_count: must be a positive integer, got {sample_count}")
    if encoding not in tensorfiles.ENCODINGS:
        raise errors.InvalidArgument(
            f"encoding: {errors.excerpt(encoding)} is not one of {list(tensorfiles.ENCODINGS)}"
        )
    if not DIGEST_RE.match(digest):
        raise errors.InvalidArgument(f"sha256: {errors.excerpt(digest)} is not sha256:<64 lowercase hex digits>")
    if size < 1:
        raise errors.InvalidArgument(f"size: must be positive, got {size}")
    if size > max_bytes:
        raise TooLarge(f"{size} bytes is over the limit of {max_bytes}")
    if len(metrics) > MAX_METRICS:
        raise errors.InvalidArgument(f"metrics: at most {MAX_METRICS}, got {len(metrics)}")
    for name, value in metrics.items():
        if not METRIC_NAME_RE.match(name):
            raise errors.InvalidArgument(f"metrics: {errors.excerpt(name)} is not a metric name")
        if not math.isfinite(value):
            raise errors.InvalidArgument(f"metrics[{name!r}]: must be finite, got {value}")
    return Header(
        release=release,
        round=round_number,
        version=version,
        samples=sample_count,
        metrics=dict(metrics),
        encoding=encoding,
        size=size,
        digest=digest,
    )


def check_bytes(header: Header, data: bytes) -> None:
    """The bytes are exactly the header's size and hash to its digest."""
    if len(data) > header.size:
        raise TooLarge(f"more bytes than the header's size {header.size}")
    if len(data) != header.size:
        raise InvalidUpdate(f"{len(data)} bytes arrived, the header said {header.size}")
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != header.digest:
        raise BadDigest(f"the bytes hash to {actual}, the header says {header.digest}")


def decode(header: Header, data: bytes, *, device: str, like: updates.Model) -> updates.Update:
    """The update's delta in the model's dtypes, checked against the round's global model `like`."""
    try:
        delta: dict[str, Any] = tensorfiles.decode_update(data, encoding=header.encoding, like=like)
        update = updates.Update(device=device, delta=delta, samples=header.samples)
        updates.check(update, like=like)
    except (tensorfiles.InvalidTensors, updates.InvalidUpdate) as e:
        raise InvalidUpdate(str(e)) from None
    return update
