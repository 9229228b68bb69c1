"""Validation of device result uploads, before anything touches the database.

A result comes from a device we do not control: every size, count, name and
number is bounded and checked here, and a bad upload is refused as a whole
with a message naming the field. The accepted result is a frozen
`ResultRecord` already in its stored encoding (internals.md: tensors as
`{"name", "shape", "data": base64(float64 LE)}`).

Pure: no I/O (numpy only, to check tensor data is finite).
"""

from __future__ import annotations

import base64
import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tether.common import errors
from tether.controller import devices, releases
from tether.spec import names

MAX_KEY_LEN = 128
MAX_METRICS = 256
MAX_COUNTS = 256
MAX_TENSORS = 64
MAX_DIMS = 8
MAX_TENSOR_BYTES = 16 * 1024 * 1024  # all tensors of one result together
MAX_SAMPLE_COUNT = 10**12
MAX_DURATION_S = 7 * 24 * 3600.0
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:/-]{0,127}$")
KEY_RE = re.compile(rf"^[\x21-\x7e]{{1,{names.MAX_IDEMPOTENCY_KEY_LEN}}}$")  # printable ASCII, no spaces


@dataclasses.dataclass(frozen=True)
class TensorIn:
    """A tensor as it arrived (proto-independent, so this module stays pure)."""

    name: str
    shape: Sequence[int]
    data: bytes


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResultRecord:
    release: str
    version: int
    idempotency_key: str
    sample_count: int
    metrics: Mapping[str, float]
    counts: Mapping[str, int]
    tensors: tuple[Mapping[str, Any], ...]
    duration_s: float


def validate_result(
    *,
    release: str,
    version: int,
    idempotency_key: str,
    sample_count: int,
    metrics: Mapping[str, float],
    counts: Mapping[str, int],
    tensors: Sequence[TensorIn],
    duration_s: float,
    max_tensor_bytes: int = MAX_TENSOR_BYTES,
) -> ResultRecord:
    if not release:
        raise errors.InvalidArgument("release: required")
    if version < 1:
        raise errors.InvalidArgument(f"version: must be >= 1, got {version}")
    if not KEY_RE.match(idempotency_key or ""):
        raise errors.InvalidArgument(
            f"idempotency_key: must be 1-{names.MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters without spaces"
        )
    if not 0 <= sample_count <= MAX_SAMPLE_COUNT:
        raise errors.InvalidArgument(f"sample_count: must be in [0, {MAX_SAMPLE_COUNT}], got {sample_count}")
    if not math.isfinite(duration_s) or not 0 <= duration_s <= MAX_DURATION_S:
        raise errors.InvalidArgument(f"duration_s: must be a finite number in [0, {MAX_DURATION_S}]")
    _check_names(metrics, field="metrics", limit=MAX_METRICS)
    for name, value in metrics.items():
        if not math.isfinite(value):
            raise errors.InvalidArgument(f"metrics[{name!r}]: {value} is not a finite number")
    _check_names(counts, field="counts", limit=MAX_COUNTS)
    return ResultRecord(
        release=release,
        version=version,
        idempotency_key=idempotency_key,
        sample_count=sample_count,
        metrics=dict(sorted(metrics.items())),
        counts=dict(sorted(counts.items())),
        tensors=_encode_tensors(tensors, max_bytes=max_tensor_bytes),
        duration_s=duration_s,
    )


def _check_names(values: Mapping[str, Any], *, field: str, limit: int) -> None:
    if len(values) > limit:
        raise errors.TooLarge(f"{field}: {len(values)} entries; the limit is {limit}")
    for name in values:
        if not NAME_RE.match(name):
            raise errors.InvalidArgument(
                f"{field}: name {name[:64]!r} must start with a letter or _ and use letters, digits and _ . : / - "
                f"(at most {MAX_KEY_LEN} characters)"
            )


def _encode_tensors(tensors: Sequence[TensorIn], *, max_bytes: int) -> tuple[Mapping[str, Any], ...]:
    if len(tensors) > MAX_TENSORS:
        raise errors.TooLarge(f"tensors: {len(tensors)} tensors; the limit is {MAX_TENSORS}")
    total = sum(len(t.data) for t in tensors)
    if total > max_bytes:
        raise errors.TooLarge(f"tensors: {total} bytes of data; the limit is {max_bytes}")
    seen: set[str] = set()
    encoded: list[Mapping[str, Any]] = []
    for i, t in enumerate(tensors):
        where = f"tensors[{i}]"
        if not NAME_RE.match(t.name):
            raise errors.InvalidArgument(f"{where}.name: {t.name[:64]!r} is not a valid name")
        if t.name in seen:
            raise errors.InvalidArgument(f"{where}.name: {t.name!r} appears twice")
        seen.add(t.name)
        shape = [int(d) for d in t.shape]
        if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
            raise errors.InvalidArgument(f"{where}.shape: {shape} must have at most {MAX_DIMS} non-negative dims")
        elements = math.prod(shape)
        if elements * 8 != len(t.data):
            raise errors.InvalidArgument(
                f"{where}.data: shape {shape} needs {elements * 8} bytes of float64, got {len(t.data)}"
            )
        if not bool(np.isfinite(np.frombuffer(t.data, dtype="<f8")).all()):
            raise errors.InvalidArgument(f"{where}.data: contains NaN or infinite values")
        encoded.append({"name": t.name, "shape": shape, "data": base64.b64encode(t.data).decode("ascii")})
    return tuple(encoded)


def refusal(rel: releases.Release | None, *, device: devices.Device, record: ResultRecord) -> errors.TetherError | None:
    """Why a new result is refused (None: accepted): it must name a live release that targets the device,
    at its current or previous version (staged: or the stable version the other devices keep).
    """
    if rel is None or rel.deleted:
        return errors.NotFound(f"release {record.release!r} does not exist")
    if not rel.targets(device.facts):
        return errors.PermissionDenied(f"release {record.release!r} does not target device {device.device_id}")
    stable = rel.stable.version if rel.stable is not None else rel.version - 1  # staged: what others keep
    if record.version not in (rel.version, rel.version - 1, stable):
        return errors.FailedPrecondition(
            f"release {record.release!r} is at version {rel.version}; results are accepted for versions "
            f"{rel.version} and {rel.version - 1}, not {record.version}"
        )
    return None
