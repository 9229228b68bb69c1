"""Backend selection, the pure part: candidates, a cost model that prunes them, the choice.

A *candidate* is one way to run a model: engine x backend x threads x
precision (`mnn/cpu/t2/high`, `onnxruntime/cuda/t1/fp32`). Selection for one
model on one device goes:

1. `enumerate_candidates`: every combination the bundle's model files and the
   device's *probed* backends allow (threads 1, 2, 4, ... up to the cores).
2. `prune`: structural rules (a backend the probe did not find; fp16 on a CPU
   without fp16 arithmetic, which MNN runs as fp32 anyway) and the cost
   model (`estimate_ms`: model FLOPs against the device's measured per-core
   throughput, a parallel-efficiency term, per-thread synchronisation and
   per-call overheads). Candidates estimated slower than `slack` times the
   best estimate are dropped; at most `max_measured` survive, best first.
3. The adapter (`tether.agent.backends`) measures the survivors on the real
   model, best estimate first, within a time budget (`reps_for` spreads it).
4. `choose`: the fastest measured candidate; one within `tie` of it that uses
   fewer threads (or the CPU instead of an accelerator) wins the tie, as it is
   cheaper for the device.

The result is cached per `cache_key(model key, device fingerprint)`; a new
model version or a changed device (new engine version, new backend, other
CPU) misses the cache and selection runs again.

Pure: no I/O, no engine imports.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Model file formats and the engine that runs each.
FORMATS: Mapping[str, str] = {".mnn": "mnn", ".onnx": "onnxruntime"}
# Precisions each engine offers. MNN: "high" = fp32, "low" = fp16 where the CPU/GPU computes it
# natively. ONNX Runtime runs the graph's own types ("fp32" for the float models bundles carry).
PRECISIONS: Mapping[str, tuple[str, ...]] = {"mnn": ("high", "low"), "onnxruntime": ("fp32",)}
GPU_BACKENDS = frozenset({"cuda", "opencl", "vulkan", "metal", "opengl", "coreml", "nnapi", "directml", "openvino"})
MAX_THREADS = 8

# Cost-model constants (milliseconds), calibrated on x86 and ARM CPUs; only ratios matter for pruning.
CALL_OVERHEAD_MS: Mapping[str, float] = {"mnn": 0.012, "onnxruntime": 0.02}
THREAD_SYNC_MS = 0.012  # per extra thread per inference: waking and joining the pool
SERIAL_FRACTION = 0.08  # share of a model's work that does not parallelise
GPU_LAUNCH_MS = 0.08  # per inference: kernel launches and synchronisation
GPU_GFLOPS = 2000.0  # order of magnitude of a discrete GPU on small-batch inference
GPU_BYTES_PER_MS = 8e6  # host<->device copies (8 GB/s)
FP16_SPEEDUP = 1.6
DEFAULT_GFLOPS_PER_CORE = 20.0


@dataclasses.dataclass(frozen=True, order=True)
class Candidate:
    engine: str
    backend: str
    threads: int
    precision: str

    @property
    def key(self) -> str:
        return f"{self.engine}/{self.backend}/t{self.threads}/{self.precision}"

    @property
    def backend_name(self) -> str:
        """ "<engine>/<backend>", as `Model.backend` and the probe spell it."""
        return f"{self.engine}/{self.backend}"

    @property
    def on_gpu(self) -> bool:
        return self.backend in GPU_BACKENDS

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Candidate:
        return cls(str(doc["engine"]), str(doc["backend"]), int(doc["threads"]), str(doc["precision"]))

    @classmethod
    def parse(cls, key: str) -> Candidate:
        """Inverse of `key`: "mnn/cpu/t2/high"."""
        parts = key.split("/")
        if len(parts) != 4 or not parts[2].startswith("t") or not parts[2][1:].isdigit():
            raise ValueError(f"candidate {key!r} is not engine/backend/tN/precision")
        return cls(parts[0], parts[1], int(parts[2][1:]), parts[3])


@dataclasses.dataclass(frozen=True)
class Device:
    """What the cost model needs to know of the device (from `profile.DeviceProfile`)."""

    cores: int
    backends: frozenset[str]  # probed "<engine>/<backend>"
    gflops_per_core: float = DEFAULT_GFLOPS_PER_CORE
    fp16: bool = False


@dataclasses.dataclass(frozen=True)
class ModelStats:
    """What the cost model needs to know of the model at the shapes it will run with."""

    engines: frozenset[str]  # engines whose model file the bundle carries
    flops: float | None = None  # per inference; None when unknown (then only structural pruning)
    io_bytes: int = 0  # input + output bytes per inference (host<->device copies)


@dataclasses.dataclass(frozen=True)
class Pruned:
    candidate: Candidate
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"candidate": self.candidate.key, "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One candidate measured on the real model: median latency of `reps` runs after warm-up, or an error."""

    candidate: Candidate
    latency_ms: float | None
    reps: int = 0
    error: str = ""
    estimate_ms: float | None = None

    @property
    def ok(self) -> bool:
        return self.latency_ms is not None and math.isfinite(self.latency_ms) and not self.error

    def to_json(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate.key,
            "latency_ms": self.latency_ms,
            "reps": self.reps,
            "error": self.error,
            "estimate_ms": self.estimate_ms,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Measurement:
        latency = doc.get("latency_ms")
        estimate = doc.get("estimate_ms")
        return cls(
            candidate=Candidate.parse(str(doc["candidate"])),
            latency_ms=None if latency is None else float(latency),
            reps=int(doc.get("reps") or 0),
            error=str(doc.get("error") or ""),
            estimate_ms=None if estimate is None else float(estimate),
        )


@dataclasses.dataclass(frozen=True)
class Selection:
    """The decision for one model on one device, as cached and reported."""

    model_key: str
    fingerprint: str
    chosen: Candidate
    latency_ms: float
    measurements: tuple[Measurement, ...] = ()
    pruned: tuple[Pruned, ...] = ()
    seconds: float = 0.0
    created_at: float = 0.0

    @property
    def cache_key(self) -> str:
        return cache_key(self.model_key, self.fingerprint)

    def is_valid_for(self, *, model_key: str, fingerprint: str) -> bool:
        return (self.model_key, self.fingerprint) == (model_key, fingerprint)

    def to_json(self) -> dict[str, Any]:
        return {
            "model_key": self.model_key,
            "fingerprint": self.fingerprint,
            "chosen": self.chosen.key,
            "latency_ms": self.latency_ms,
            "measurements": [m.to_json() for m in self.measurements],
            "pruned": [p.to_json() for p in self.pruned],
            "seconds": self.seconds,
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Selection:
        return cls(
            model_key=str(doc["model_key"]),
            fingerprint=str(doc["fingerprint"]),
            chosen=Candidate.parse(str(doc["chosen"])),
            latency_ms=float(doc["latency_ms"]),
            measurements=tuple(Measurement.from_json(m) for m in doc.get("measurements") or ()),
            pruned=tuple(
                Pruned(Candidate.parse(str(p["candidate"])), str(p.get("reason", ""))) for p in doc.get("pruned") or ()
            ),
            seconds=float(doc.get("seconds") or 0.0),
            created_at=float(doc.get("created_at") or 0.0),
        )


class NoUsableCandidate(Exception):
    """Every measured candidate failed (the model does not load or run on this device)."""

    def __init__(self, measurements: Sequence[Measurement]) -> None:
        self.measurements = tuple(measurements)
        by_error: dict[str, list[str]] = {}  # the same failure on every thread count is said once
        for m in self.measurements:
            by_error.setdefault(m.error or "no latency", []).append(m.candidate.key)
        detail = "; ".join(f"{', '.join(keys)}: {error}" for error, keys in by_error.items())
        super().__init__(detail or "no candidate to try")


# ---------------------------------------------------------------- candidates


def thread_counts(cores: int, *, max_threads: int = MAX_THREADS) -> tuple[int, ...]:
    """1, 2, 4, ... up to the cores, plus the core count itself (capped at `max_threads`)."""
    top = max(1, min(int(cores), max_threads))
    counts = {1, top}
    t = 2
    while t < top:
        counts.add(t)
        t *= 2
    return tuple(sorted(counts))


def enumerate_candidates(*, engines: Iterable[str], device: Device, gpu_backends: bool = True) -> list[Candidate]:
    """Every engine x backend x threads x precision worth naming for these model formats.

    Backends are the CPU plus each accelerator the probe reported for that
    engine; GPU candidates run one host thread.
    """
    out: list[Candidate] = []
    for engine in sorted(set(engines)):
        backends = ["cpu"]
        if gpu_backends:
            backends += sorted(
                b.split("/", 1)[1]
                for b in device.backends
                if b.startswith(engine + "/") and b.split("/", 1)[1] != "cpu"
            )
        for backend in backends:
            threads = (1,) if backend in GPU_BACKENDS else thread_counts(device.cores)
            for t in threads:
                for precision in PRECISIONS.get(engine, ("high",)):
                    out.append(Candidate(engine, backend, t, precision))
    return out


# ---------------------------------------------------------------- cost model


def estimate_ms(c: Candidate, model: ModelStats, device: Device) -> float | None:
    """Predicted latency of one inference; None when the model's FLOPs are unknown."""
    if model.flops is None:
        return None
    overhead = CALL_OVERHEAD_MS.get(c.engine, 0.02)
    if c.on_gpu:
        return overhead + GPU_LAUNCH_MS + model.io_bytes / GPU_BYTES_PER_MS + model.flops / (GPU_GFLOPS * 1e6)
    gflops = device.gflops_per_core if device.gflops_per_core > 0 else DEFAULT_GFLOPS_PER_CORE
    single_ms = model.flops / (gflops * 1e6)
    if c.precision == "low" and device.fp16:
        single_ms /= FP16_SPEEDUP
    t = max(1, c.threads)
    parallel_ms = single_ms * (SERIAL_FRACTION + (1 - SERIAL_FRACTION) / t)
    return overhead + parallel_ms + THREAD_SYNC_MS * (t - 1)


def prune(
    candidates: Iterable[Candidate],
    *,
    model: ModelStats,
    device: Device,
    slack: float = 2.5,
    max_measured: int = 6,
) -> tuple[list[tuple[Candidate, float | None]], list[Pruned]]:
    """Survivors (best estimate first, with their estimates) and what was pruned, with reasons.

    Structural rules first; then, when the FLOPs are known, the cost model
    drops candidates estimated slower than `slack` x the best estimate, and
    caps the survivors at `max_measured`. The best-estimated candidate of
    each engine always survives: the cost model is coarse, and engines differ
    in kernels it does not see.
    """
    survivors: list[tuple[Candidate, float | None]] = []
    pruned: list[Pruned] = []
    for c in candidates:
        if c.engine not in model.engines:
            pruned.append(Pruned(c, f"the bundle carries no {c.engine} model"))
        elif c.backend != "cpu" and c.backend_name not in device.backends:
            pruned.append(Pruned(c, f"{c.backend_name} did not run in the device probe (it would fall back to cpu)"))
        elif c.threads > max(1, device.cores):
            pruned.append(Pruned(c, f"{c.threads} threads on {device.cores} cores"))
        elif c.precision == "low" and not c.on_gpu and not device.fp16:
            pruned.append(Pruned(c, "no native fp16 on this CPU: runs as fp32, same as high"))
        else:
            survivors.append((c, estimate_ms(c, model, device)))
    if model.flops is None:
        # Unknown cost: keep every engine's single-thread CPU candidate first, then the rest in a stable order.
        survivors.sort(key=lambda ce: (ce[0].on_gpu, ce[0].threads != 1, ce[0]))
        dropped = survivors[max_measured:]
        pruned += [Pruned(c, f"over the limit of {max_measured} measured candidates") for c, _ in dropped]
        return survivors[:max_measured], pruned
    survivors.sort(key=lambda ce: (ce[1], ce[0]))
    best = survivors[0][1] if survivors else None
    keep: list[tuple[Candidate, float | None]] = []
    engines_kept: set[str] = set()
    for c, est in survivors:
        first_of_engine = c.engine not in engines_kept
        if not first_of_engine and best is not None and est is not None and est > slack * best:
            pruned.append(Pruned(c, f"cost model: {est:.4g} ms > {slack:g} x best estimate {best:.4g} ms"))
        elif not first_of_engine and len(keep) >= max_measured:
            pruned.append(Pruned(c, f"over the limit of {max_measured} measured candidates"))
        else:
            keep.append((c, est))
            engines_kept.add(c.engine)
    return keep, pruned


# ---------------------------------------------------------------- measuring and choosing


def reps_for(*, time_left_s: float, candidates_left: int, run_s: float, min_reps: int = 5, max_reps: int = 200) -> int:
    """How many timed runs a candidate gets: its share of the budget over its cost, within bounds."""
    if run_s <= 0:
        return max_reps
    share = max(0.0, time_left_s) / max(1, candidates_left)
    return int(min(max_reps, max(min_reps, share // run_s)))


def median_ms(samples_s: Sequence[float]) -> float:
    return statistics.median(samples_s) * 1000.0


def choose(measurements: Iterable[Measurement], *, tie: float = 0.03) -> Measurement:
    """The fastest candidate; within `tie` of it, the cheaper one (CPU over accelerator, fewer threads)."""
    all_ = list(measurements)
    ok = [m for m in all_ if m.ok]
    if not ok:
        raise NoUsableCandidate(all_)
    best = min(ok, key=lambda m: (m.latency_ms, m.candidate))
    assert best.latency_ms is not None
    near = [m for m in ok if m.latency_ms is not None and m.latency_ms <= best.latency_ms * (1 + tie)]
    return min(near, key=lambda m: (m.candidate.on_gpu, m.candidate.threads, m.latency_ms, m.candidate))


# ---------------------------------------------------------------- cache keys


def model_key(files: Mapping[str, str], inputs: Mapping[str, Sequence[int]]) -> str:
    """Identity of "this model at these shapes": engine -> file digest, plus the input shapes."""
    doc = {
        "files": dict(sorted(files.items())),
        "inputs": {k: [int(d) for d in v] for k, v in sorted(inputs.items())},
    }
    return "sha256:" + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def cache_key(model_key_: str, fingerprint: str) -> str:
    return f"{model_key_}@{fingerprint}"
