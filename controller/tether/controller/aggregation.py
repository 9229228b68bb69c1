"""Aggregation maths: pure functions and an incremental accumulator (numpy only, no I/O).

Why an accumulator rather than "average these rows": the Celery task folds
results in as they arrive and stores the running state with the aggregate, so
each round costs O(new results) instead of O(all results). Everything here is
designed around that fold:

- `Accumulator` keeps *spec-independent* running sums for every tensor and
  metric (sample-weighted sum, plain sum, number of contributions, total
  weight) plus integer count sums, result/sample totals and the set of
  contributing devices. `finish(spec)` turns that into the aggregate body of
  `docs/internals.md` for any `AggregationSpec`, so the state never has to be
  recomputed when a spec is read.
- `add` is a left fold: folding results r1..rn one at a time, with the state
  serialised (`to_state` / `from_state`, bit-exact) at any point in between,
  gives bit-for-bit the same body as folding them all at once in that order.
- `merge` combines two accumulators over disjoint sets of results (shards).
  Integer parts (results, samples, counts, devices, weights) are exact, so
  merge is exactly associative for them; floating-point sums are associative
  up to rounding (a few ulps), as any float sum is.

Bad input never crashes a round: a result that cannot be decoded, carries a
non-finite number, or whose tensor shape disagrees with the shape already
established for that tensor name is *rejected whole* (its sample count weights
all of its values, so keeping part of it would skew the rest), counted, and
reported in the body with a typed reason. The first accepted result fixes a
tensor's shape. A result whose values would overflow a running sum to
infinity is rejected the same way, so the state stays finite.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from tether.common import errors

MAX_TENSOR_ELEMENTS = 1 << 26  # 64 Mi float64 values (512 MiB) per tensor
MAX_TENSOR_NDIM = 8
MAX_REJECTIONS_REPORTED = 50  # the body lists the first N rejections; `rejected` counts them all
STATE_FORMAT = 1

_F8 = np.dtype("<f8")


# --------------------------------------------------------------------------- errors


class InvalidResult(errors.InvalidArgument):
    """A result cannot be folded into an aggregate. `field` names the offending part."""

    reason = "InvalidResult"

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class InvalidTensor(InvalidResult):
    """A tensor's encoding is malformed (name, shape, base64, byte length)."""

    reason = "InvalidTensor"


class ShapeMismatch(InvalidResult):
    """A tensor's shape differs from the shape other results established for that name."""

    reason = "ShapeMismatch"

    def __init__(self, name: str, *, expected: tuple[int, ...], got: tuple[int, ...]) -> None:
        super().__init__(f"shape {list(got)} does not match {list(expected)}", field=f"tensors.{name}")
        self.name = name
        self.expected = expected
        self.got = got


class NonFinite(InvalidResult):
    """A value is NaN or infinite, or adding it would overflow a running sum."""

    reason = "NonFinite"


class InvalidState(errors.InvalidArgument):
    """A stored accumulator state cannot be read back."""


# --------------------------------------------------------------------------- spec


class TensorRule(enum.StrEnum):
    WEIGHTED_MEAN = "weightedMean"
    MEAN = "mean"
    SUM = "sum"


class MetricRule(enum.StrEnum):
    WEIGHTED_MEAN = "weightedMean"
    MEAN = "mean"


class CountRule(enum.StrEnum):
    SUM = "sum"


@dataclasses.dataclass(frozen=True, kw_only=True)
class AggregationSpec:
    """MLTask `spec.aggregation`. Missing keys take the defaults below."""

    tensors: TensorRule = TensorRule.WEIGHTED_MEAN
    metrics: MetricRule = MetricRule.WEIGHTED_MEAN
    counts: CountRule = CountRule.SUM

    @classmethod
    def from_json(cls, obj: Mapping[str, Any] | None) -> AggregationSpec:
        if obj is None:
            return cls()
        if not isinstance(obj, Mapping):
            raise errors.InvalidSpec("must be an object", field="aggregation")
        unknown = sorted(set(obj) - {"tensors", "metrics", "counts"})
        if unknown:
            raise errors.InvalidSpec(f"unknown keys {unknown}", field="aggregation")
        values: dict[str, Any] = {}
        for key, rule in (("tensors", TensorRule), ("metrics", MetricRule), ("counts", CountRule)):
            if key in obj:
                try:
                    values[key] = rule(obj[key])
                except ValueError:
                    allowed = [r.value for r in rule]
                    raise errors.InvalidSpec(
                        f"{obj[key]!r} is not one of {allowed}", field=f"aggregation.{key}"
                    ) from None
        return cls(**values)

    def to_json(self) -> dict[str, str]:
        return {"tensors": self.tensors.value, "metrics": self.metrics.value, "counts": self.counts.value}


# --------------------------------------------------------------------------- tensors and results


def encode_array(array: np.ndarray) -> str:
    """base64 of the float64 little-endian, row-major bytes of `array`."""
    return base64.b64encode(np.ascontiguousarray(array, dtype=_F8).tobytes()).decode("ascii")


def encode_tensor(name: str, array: np.ndarray) -> dict[str, Any]:
    """The wire form of one tensor in `results.tensors`."""
    arr = np.asarray(array, dtype=np.float64)
    return {"name": name, "shape": [int(d) for d in arr.shape], "data": encode_array(arr)}


def _decode_shape(shape: Any, *, field: str) -> tuple[int, ...]:
    if not isinstance(shape, list | tuple) or len(shape) > MAX_TENSOR_NDIM:
        raise InvalidTensor(f"shape must be a list of at most {MAX_TENSOR_NDIM} integers", field=field)
    dims: list[int] = []
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise InvalidTensor(f"shape {shape!r} must hold non-negative integers", field=field)
        dims.append(d)
    if math.prod(dims) > MAX_TENSOR_ELEMENTS:
        raise InvalidTensor(f"{math.prod(dims)} elements exceed the limit of {MAX_TENSOR_ELEMENTS}", field=field)
    return tuple(dims)


def decode_array(data: Any, shape: tuple[int, ...], *, field: str) -> np.ndarray:
    """Inverse of `encode_array`: a read-only float64 array of `shape`."""
    if not isinstance(data, str):
        raise InvalidTensor("data must be a base64 string", field=field)
    expected = 8 * math.prod(shape)
    if len(data) > 4 * ((expected + 2) // 3) + 4:  # refuse to decode something obviously too long
        raise InvalidTensor(f"data is longer than {expected} bytes of shape {list(shape)}", field=field)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidTensor("data is not valid base64", field=field) from None
    if len(raw) != expected:
        raise InvalidTensor(f"{len(raw)} bytes do not hold shape {list(shape)} of float64", field=field)
    return np.frombuffer(raw, dtype=_F8).reshape(shape)


def decode_tensor(obj: Any) -> tuple[str, np.ndarray]:
    """`{"name", "shape", "data"}` → (name, float64 array)."""
    if not isinstance(obj, Mapping):
        raise InvalidTensor("each tensor must be an object", field="tensors")
    name = obj.get("name")
    if not isinstance(name, str) or not name or len(name) > 256:
        raise InvalidTensor("name must be a non-empty string of at most 256 characters", field="tensors")
    field = f"tensors.{name}"
    shape = _decode_shape(obj.get("shape"), field=field)
    return name, decode_array(obj.get("data"), shape, field=field)


def decode_tensors(objs: Any) -> dict[str, np.ndarray]:
    if not isinstance(objs, list):
        raise InvalidTensor("must be a list", field="tensors")
    out: dict[str, np.ndarray] = {}
    for obj in objs:
        name, arr = decode_tensor(obj)
        if name in out:
            raise InvalidTensor("appears twice", field=f"tensors.{name}")
        out[name] = arr
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class RawResult:
    """One `results` row as stored: JSON columns not yet decoded."""

    result_id: int
    device_id: str
    sample_count: int
    metrics: Any = dataclasses.field(default_factory=dict)
    counts: Any = dataclasses.field(default_factory=dict)
    tensors: Any = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Result:
    """A decoded, validated result (the unit the accumulator folds)."""

    result_id: int
    device_id: str
    sample_count: int
    metrics: Mapping[str, float]
    counts: Mapping[str, int]
    tensors: Mapping[str, np.ndarray]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def decode_result(raw: RawResult) -> Result:
    """Validate and decode a stored row; raise an `InvalidResult` subclass if it cannot be folded."""
    if isinstance(raw.sample_count, bool) or not isinstance(raw.sample_count, int) or raw.sample_count < 0:
        raise InvalidResult("must be a non-negative integer", field="sample_count")
    if not isinstance(raw.metrics, Mapping):
        raise InvalidResult("must be an object", field="metrics")
    metrics: dict[str, float] = {}
    for k, v in raw.metrics.items():
        if not _is_number(v):
            raise InvalidResult(f"{v!r} is not a number", field=f"metrics.{k}")
        f = float(v)
        if not math.isfinite(f):
            raise NonFinite(f"{v!r} is not finite", field=f"metrics.{k}")
        metrics[k] = f
    if not isinstance(raw.counts, Mapping):
        raise InvalidResult("must be an object", field="counts")
    counts: dict[str, int] = {}
    for k, v in raw.counts.items():
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidResult(f"{v!r} is not an integer", field=f"counts.{k}")
        counts[k] = v
    tensors = decode_tensors(raw.tensors)
    for name, arr in tensors.items():
        if not np.isfinite(arr).all():
            raise NonFinite("holds NaN or infinite values", field=f"tensors.{name}")
    return Result(
        result_id=raw.result_id,
        device_id=raw.device_id,
        sample_count=raw.sample_count,
        metrics=metrics,
        counts=counts,
        tensors=tensors,
    )


# --------------------------------------------------------------------------- running sums


@dataclasses.dataclass(kw_only=True)
class TensorSums:
    """Running sums for one tensor name. `weight` is the exact sum of sample counts."""

    shape: tuple[int, ...]
    weighted: np.ndarray  # Σ sample_count · x
    plain: np.ndarray  # Σ x
    n: int = 0  # number of results that carried this tensor
    weight: int = 0  # Σ sample_count over those results

    def value(self, rule: TensorRule) -> np.ndarray:
        if rule is TensorRule.SUM:
            return self.plain
        if rule is TensorRule.WEIGHTED_MEAN and self.weight > 0:
            return self.weighted / float(self.weight)
        # plain mean; also the weighted mean's fallback when every contributor had 0 samples
        return self.plain / float(self.n) if self.n else self.plain


@dataclasses.dataclass(kw_only=True)
class ScalarSums:
    """Running sums for one metric name."""

    weighted: float = 0.0
    plain: float = 0.0
    n: int = 0
    weight: int = 0

    def value(self, rule: MetricRule) -> float:
        if rule is MetricRule.WEIGHTED_MEAN and self.weight > 0:
            return self.weighted / float(self.weight)
        return self.plain / self.n if self.n else 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rejection:
    result_id: int
    device_id: str
    reason: str  # the error class: InvalidResult, InvalidTensor, ShapeMismatch, NonFinite
    field: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fhex(x: float) -> str:
    return float.hex(x)


def _funhex(s: Any) -> float:
    if not isinstance(s, str):
        raise InvalidState(f"{s!r} is not a hex float")
    return float.fromhex(s)


@dataclasses.dataclass(kw_only=True)
class Accumulator:
    """Running state of one aggregate. Fold with `add`, combine with `merge`, read with `finish`."""

    results: int = 0
    samples: int = 0
    devices: set[str] = dataclasses.field(default_factory=set)
    metrics: dict[str, ScalarSums] = dataclasses.field(default_factory=dict)
    tensors: dict[str, TensorSums] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    rejected: int = 0
    rejections: list[Rejection] = dataclasses.field(default_factory=list)

    # ---- folding

    def add(self, result: Result | RawResult) -> Rejection | None:
        """Fold one result in. Returns None when accepted, or the `Rejection` recorded instead.

        All-or-nothing: a rejected result changes nothing but the rejection tally.
        """
        try:
            decoded = decode_result(result) if isinstance(result, RawResult) else result
            updates = self._tensor_updates(decoded)
        except InvalidResult as e:
            return self._reject(result.result_id, result.device_id, e)
        for name, (weighted, plain) in updates.items():
            sums = self.tensors.get(name)
            if sums is None:
                sums = self.tensors[name] = TensorSums(shape=weighted.shape, weighted=weighted, plain=plain)
            else:
                sums.weighted, sums.plain = weighted, plain
            sums.n += 1
            sums.weight += decoded.sample_count
        w = float(decoded.sample_count)
        for name, value in decoded.metrics.items():
            m = self.metrics.setdefault(name, ScalarSums())
            m.weighted += w * value
            m.plain += value
            m.n += 1
            m.weight += decoded.sample_count
        for name, c in decoded.counts.items():
            self.counts[name] = self.counts.get(name, 0) + c
        self.results += 1
        self.samples += decoded.sample_count
        self.devices.add(decoded.device_id)
        return None

    def _tensor_updates(self, result: Result) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """New (weighted, plain) sums per tensor of `result`, computed without touching `self`."""
        w = float(result.sample_count)
        updates: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, x in result.tensors.items():
            sums = self.tensors.get(name)
            if sums is not None and sums.shape != x.shape:
                raise ShapeMismatch(name, expected=sums.shape, got=x.shape)
            with np.errstate(over="ignore", invalid="ignore"):
                if sums is None:
                    weighted, plain = w * x, np.array(x, dtype=np.float64)
                else:
                    weighted, plain = sums.weighted + w * x, sums.plain + x
            if not (np.isfinite(weighted).all() and np.isfinite(plain).all()):
                raise NonFinite("is not finite, or would overflow the running sum", field=f"tensors.{name}")
            updates[name] = (weighted, plain)
        for name, value in result.metrics.items():
            m = self.metrics.get(name)
            weighted_m = (m.weighted if m else 0.0) + w * value
            plain_m = (m.plain if m else 0.0) + value
            if not (math.isfinite(weighted_m) and math.isfinite(plain_m)):
                raise NonFinite("would overflow the running sum", field=f"metrics.{name}")
        return updates

    def _reject(self, result_id: int, device_id: str, error: InvalidResult) -> Rejection:
        rejection = Rejection(
            result_id=result_id,
            device_id=device_id,
            reason=type(error).reason,
            field=error.field,
            message=str(error),
        )
        self.rejected += 1
        if len(self.rejections) < MAX_REJECTIONS_REPORTED:
            self.rejections.append(rejection)
        return rejection

    def add_all(self, results: Iterable[Result | RawResult]) -> list[Rejection]:
        return [r for r in (self.add(x) for x in results) if r is not None]

    def merge(self, other: Accumulator) -> Accumulator:
        """A new accumulator over the results of both (which must be disjoint sets of results).

        Raises `ShapeMismatch` when the two established different shapes for a tensor name.
        """
        out = Accumulator(
            results=self.results + other.results,
            samples=self.samples + other.samples,
            devices=self.devices | other.devices,
            counts=dict(self.counts),
            rejected=self.rejected + other.rejected,
            rejections=(self.rejections + other.rejections)[:MAX_REJECTIONS_REPORTED],
        )
        for name, c in other.counts.items():
            out.counts[name] = out.counts.get(name, 0) + c
        for name in self.metrics.keys() | other.metrics.keys():
            a, b = self.metrics.get(name, ScalarSums()), other.metrics.get(name, ScalarSums())
            out.metrics[name] = ScalarSums(
                weighted=a.weighted + b.weighted, plain=a.plain + b.plain, n=a.n + b.n, weight=a.weight + b.weight
            )
        for name in self.tensors.keys() | other.tensors.keys():
            ta, tb = self.tensors.get(name), other.tensors.get(name)
            if ta is None or tb is None:
                t = ta or tb
                assert t is not None
                out.tensors[name] = dataclasses.replace(t, weighted=t.weighted.copy(), plain=t.plain.copy())
                continue
            if ta.shape != tb.shape:
                raise ShapeMismatch(name, expected=ta.shape, got=tb.shape)
            out.tensors[name] = TensorSums(
                shape=ta.shape,
                weighted=ta.weighted + tb.weighted,
                plain=ta.plain + tb.plain,
                n=ta.n + tb.n,
                weight=ta.weight + tb.weight,
            )
        return out

    # ---- reading

    def finish(self, spec: AggregationSpec | None = None) -> dict[str, Any]:
        """The aggregate body (docs/internals.md, "Aggregation"), JSON-able, every number finite."""
        spec = spec or AggregationSpec()
        tensors: dict[str, Any] = {}
        for name in sorted(self.tensors):
            sums = self.tensors[name]
            with np.errstate(over="ignore", invalid="ignore"):
                value = sums.value(spec.tensors)
            values = [_finite_or_none(v) for v in value.reshape(-1).tolist()]
            tensors[name] = {"shape": list(sums.shape), "values": values}
        return {
            "results": self.results,
            "devices": len(self.devices),
            "samples": self.samples,
            "metrics": {name: _finite_or_none(self.metrics[name].value(spec.metrics)) for name in sorted(self.metrics)},
            "tensors": tensors,
            "counts": {name: self.counts[name] for name in sorted(self.counts)},
            "rejected": self.rejected,
            "rejections": [r.to_json() for r in self.rejections],
            "spec": spec.to_json(),
        }

    # ---- persistence (bit-exact)

    def to_state(self) -> dict[str, Any]:
        """JSON-able state; `from_state(to_state())` folds on bit-for-bit identically."""
        return {
            "format": STATE_FORMAT,
            "results": self.results,
            "samples": self.samples,
            "devices": sorted(self.devices),
            "counts": dict(self.counts),
            "metrics": {
                k: {"weighted": _fhex(m.weighted), "plain": _fhex(m.plain), "n": m.n, "weight": m.weight}
                for k, m in self.metrics.items()
            },
            "tensors": {
                k: {
                    "shape": list(t.shape),
                    "weighted": encode_array(t.weighted),
                    "plain": encode_array(t.plain),
                    "n": t.n,
                    "weight": t.weight,
                }
                for k, t in self.tensors.items()
            },
            "rejected": self.rejected,
            "rejections": [r.to_json() for r in self.rejections],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Accumulator:
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise InvalidState(f"unsupported accumulator state format {found!r}")
        try:
            tensors: dict[str, TensorSums] = {}
            for k, t in state["tensors"].items():
                shape = tuple(int(d) for d in t["shape"])
                tensors[k] = TensorSums(
                    shape=shape,
                    weighted=decode_array(t["weighted"], shape, field=k).copy(),
                    plain=decode_array(t["plain"], shape, field=k).copy(),
                    n=int(t["n"]),
                    weight=int(t["weight"]),
                )
            return cls(
                results=int(state["results"]),
                samples=int(state["samples"]),
                devices={str(d) for d in _list(state["devices"])},
                counts={k: int(v) for k, v in state["counts"].items()},
                metrics={
                    k: ScalarSums(
                        weighted=_funhex(m["weighted"]),
                        plain=_funhex(m["plain"]),
                        n=int(m["n"]),
                        weight=int(m["weight"]),
                    )
                    for k, m in state["metrics"].items()
                },
                tensors=tensors,
                rejected=int(state["rejected"]),
                rejections=[Rejection(**r) for r in state["rejections"]],
            )
        except (KeyError, TypeError, ValueError, AttributeError, InvalidTensor) as e:
            raise InvalidState(f"corrupt accumulator state: {e}") from e


def _list(x: Any) -> list[Any]:
    if not isinstance(x, list):
        raise TypeError(f"expected a list, not {type(x).__name__}")
    return x


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def aggregate(results: Iterable[Result | RawResult], spec: AggregationSpec | None = None) -> dict[str, Any]:
    """Batch form: the body for `results` folded in order (what the task computes incrementally)."""
    acc = Accumulator()
    acc.add_all(results)
    return acc.finish(spec)
