"""A task's result: validation and conversion to the wire (`UploadResultRequest`).

What `run(ctx)` returns comes from bundle code, so it is checked like any
other untrusted input before it leaves the device: types, names, finite
numbers, sizes. Tensors travel as little-endian float64 (see the proto).
Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from tether.common import errors
from tether.proto.v1 import tether_pb2 as pb

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:/-]{0,127}$")
MAX_METRICS = 256
MAX_COUNTS = 256
MAX_TENSORS = 64
MAX_TENSOR_ELEMENTS = 1 << 20
MAX_TOTAL_ELEMENTS = 4 << 20
MAX_DIMS = 8
MAX_SAMPLE_COUNT = 1 << 40
INT64_MAX = (1 << 63) - 1


@dataclasses.dataclass(frozen=True)
class TaskResult:
    sample_count: int
    metrics: Mapping[str, float]
    tensors: Mapping[str, np.ndarray]  # float64
    counts: Mapping[str, int]


def _name(kind: str, key: Any) -> str:
    if not isinstance(key, str) or not NAME_RE.match(key):
        raise errors.TaskFailed(f"result {kind}: name {key!r} must match {NAME_RE.pattern}")
    return key


def _mapping(doc: Mapping[str, Any], field: str, limit: int) -> Mapping[Any, Any]:
    value = doc.get(field, {})
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise errors.TaskFailed(f"result {field}: must be a dict, got {type(value).__name__}")
    if len(value) > limit:
        raise errors.TaskFailed(f"result {field}: {len(value)} entries; the limit is {limit}")
    return value


def _int(value: Any, what: str, *, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        if isinstance(value, float | np.floating) and float(value).is_integer():
            value = int(value)
        else:
            raise errors.TaskFailed(f"{what}: must be an integer, got {value!r}")
    value = int(value)
    if not lo <= value <= hi:
        raise errors.TaskFailed(f"{what}: {value} is outside [{lo}, {hi}]")
    return value


def validate(doc: Any) -> TaskResult:
    """Check a task's return value; raise TaskFailed saying exactly what is wrong."""
    if not isinstance(doc, Mapping):
        raise errors.TaskFailed(f"run(ctx) must return a dict, got {type(doc).__name__}")
    unknown = set(doc) - {"sample_count", "metrics", "tensors", "counts"}
    if unknown:
        raise errors.TaskFailed(f"result has unknown keys {sorted(map(str, unknown))}")
    if "sample_count" not in doc:
        raise errors.TaskFailed("result: sample_count is required")
    sample_count = _int(doc["sample_count"], "result sample_count", lo=0, hi=MAX_SAMPLE_COUNT)

    metrics: dict[str, float] = {}
    for key, value in _mapping(doc, "metrics", MAX_METRICS).items():
        name = _name("metrics", key)
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise errors.TaskFailed(f"result metrics[{name}]: must be a number, got {type(value).__name__}")
        f = float(value)
        if not math.isfinite(f):
            raise errors.TaskFailed(f"result metrics[{name}]: {f} is not finite")
        metrics[name] = f

    counts: dict[str, int] = {}
    for key, value in _mapping(doc, "counts", MAX_COUNTS).items():
        name = _name("counts", key)
        counts[name] = _int(value, f"result counts[{name}]", lo=-INT64_MAX, hi=INT64_MAX)

    tensors: dict[str, np.ndarray] = {}
    total = 0
    for key, value in _mapping(doc, "tensors", MAX_TENSORS).items():
        name = _name("tensors", key)
        try:
            arr = np.asarray(value)
        except Exception as e:
            raise errors.TaskFailed(f"result tensors[{name}]: not an array: {e}") from None
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise errors.TaskFailed(f"result tensors[{name}]: dtype {arr.dtype} is not numeric")
        if np.iscomplexobj(arr):
            raise errors.TaskFailed(f"result tensors[{name}]: complex values are not supported")
        if arr.ndim > MAX_DIMS:
            raise errors.TaskFailed(f"result tensors[{name}]: {arr.ndim} dimensions; the limit is {MAX_DIMS}")
        if arr.size > MAX_TENSOR_ELEMENTS:
            raise errors.TaskFailed(f"result tensors[{name}]: {arr.size} elements; the limit is {MAX_TENSOR_ELEMENTS}")
        total += arr.size
        if total > MAX_TOTAL_ELEMENTS:
            raise errors.TaskFailed(f"result tensors: more than {MAX_TOTAL_ELEMENTS} elements in all")
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise errors.TaskFailed(f"result tensors[{name}]: contains NaN or infinite values")
        tensors[name] = arr
    return TaskResult(sample_count=sample_count, metrics=metrics, tensors=tensors, counts=counts)


def to_upload_request(
    result: TaskResult, *, release: str, version: int, idempotency_key: str, duration_s: float
) -> pb.UploadResultRequest:
    return pb.UploadResultRequest(
        release=release,
        version=int(version),
        idempotency_key=idempotency_key,
        sample_count=result.sample_count,
        metrics=dict(result.metrics),
        tensors=[
            pb.Tensor(name=name, shape=list(arr.shape), data=np.ascontiguousarray(arr, dtype="<f8").tobytes())
            for name, arr in result.tensors.items()
        ],
        counts=dict(result.counts),
        duration_s=float(duration_s),
    )


def tensor_from_proto(t: pb.Tensor) -> np.ndarray:
    """Decode a wire tensor (for tests and tools)."""
    return np.frombuffer(t.data, dtype="<f8").reshape(tuple(t.shape))
