"""The device profile: what this machine is, as far as choosing an engine backend goes.

A `DeviceProfile` holds the CPU model, logical cores, the SIMD flags that
matter to tensor engines, total memory, GPUs seen by the kernel, the engine
backends that *really* run (probed in a child process, see
`engine.detect_backends`: MNN silently falls back to CPU when asked for a
backend it lacks, so asking is not enough), the engine versions, and a
measured single-core throughput for the cost model.

`fingerprint` hashes the parts that change which backend is fastest
(hardware, probed backends, engine versions), not the noisy throughput
figure, so a cached backend choice is re-checked exactly when the device
really changed.

Parsing (`parse_cpuinfo`, `parse_meminfo`, `fingerprint`) is pure; `collect`
reads /proc and /sys and runs the probes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping
from typing import Any

# SIMD features that tensor engines dispatch on (x86 and ARM spellings as /proc/cpuinfo writes them).
SIMD_FLAGS = frozenset(
    {
        # x86
        "sse4_1",
        "sse4_2",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "avx_vnni",
        "amx_bf16",
        "amx_int8",
        # ARM (aarch64 "Features")
        "neon",
        "asimd",
        "asimdhp",
        "asimddp",
        "fphp",
        "i8mm",
        "bf16",
        "sve",
        "sve2",
        "sme",
        "sme2",
    }
)
# Flags meaning the CPU computes in fp16 natively (MNN's "low" precision then really is fp16).
FP16_FLAGS = frozenset({"asimdhp", "fphp", "avx512_fp16"})
_GPU_VENDORS = {"0x10de": "nvidia", "0x1002": "amd", "0x8086": "intel", "0x13b5": "arm", "0x5143": "qualcomm"}


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    arch: str
    cpu_model: str
    cores: int
    simd: tuple[str, ...]  # sorted, only SIMD_FLAGS members
    memory_mb: int
    gpus: tuple[str, ...]  # e.g. ("nvidia:NVIDIA H100 80GB HBM3",) or ("amd:card0",)
    backends: tuple[str, ...]  # probed, e.g. ("mnn/cpu", "onnxruntime/cpu", "onnxruntime/cuda")
    engines: Mapping[str, str] = dataclasses.field(default_factory=dict)  # engine -> version
    gflops_per_core: float = 0.0  # measured fp32 matmul throughput of one core; 0 = not measured

    @property
    def fp16(self) -> bool:
        """Native fp16 arithmetic on the CPU."""
        return bool(FP16_FLAGS & set(self.simd))

    @property
    def fingerprint(self) -> str:
        return fingerprint(self)

    def to_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["simd"], doc["gpus"], doc["backends"] = list(self.simd), list(self.gpus), list(self.backends)
        doc["engines"] = dict(self.engines)
        doc["fingerprint"] = self.fingerprint
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> DeviceProfile:
        return cls(
            arch=str(doc.get("arch", "")),
            cpu_model=str(doc.get("cpu_model", "")),
            cores=int(doc.get("cores", 1)),
            simd=tuple(sorted(str(f) for f in doc.get("simd") or ())),
            memory_mb=int(doc.get("memory_mb", 0)),
            gpus=tuple(str(g) for g in doc.get("gpus") or ()),
            backends=tuple(str(b) for b in doc.get("backends") or ()),
            engines={str(k): str(v) for k, v in (doc.get("engines") or {}).items()},
            gflops_per_core=float(doc.get("gflops_per_core", 0.0)),
        )


def fingerprint(p: DeviceProfile) -> str:
    """sha256 over what decides the fastest backend; stable across reboots and load."""
    doc = {
        "arch": p.arch,
        "cpu_model": p.cpu_model,
        "cores": p.cores,
        "simd": sorted(p.simd),
        "gpus": sorted(p.gpus),
        "backends": sorted(p.backends),
        "engines": dict(sorted(p.engines.items())),
    }
    return "sha256:" + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- pure parsing


def parse_cpuinfo(text: str) -> tuple[str, int, frozenset[str]]:
    """(CPU model, logical processors, all feature flags) from /proc/cpuinfo text (x86 or ARM)."""
    model = ""
    processors = 0
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "processor":
            processors += 1
        elif key in {"model name", "hardware", "cpu model"} and not model:
            model = value
        elif key in {"flags", "features"}:
            flags.update(value.split())
    if not model:  # ARM without a model name: implementer/part identify the core type
        ids: dict[str, str] = {}
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in {"CPU implementer", "CPU part"}:
                ids.setdefault(key.strip(), value.strip())
        if ids:
            model = f"arm {ids.get('CPU implementer', '?')}:{ids.get('CPU part', '?')}"
    return model, processors, frozenset(flags)


def parse_meminfo(text: str) -> int:
    """MemTotal in MiB from /proc/meminfo text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                kib = int(parts[1])
                return kib // 1024 if len(parts) < 3 or parts[2].lower() == "kb" else kib // (1024 * 1024)
    return 0


def simd_flags(flags: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(SIMD_FLAGS & set(flags)))


# ---------------------------------------------------------------- I/O


def _read(path: str) -> str:
    try:
        return pathlib.Path(path).read_text(errors="replace")
    except OSError:
        return ""


def detect_gpus(*, proc: str = "/proc", sys_root: str = "/sys") -> tuple[str, ...]:
    """GPUs the kernel exposes: NVIDIA's driver entries, then DRM cards by PCI vendor."""
    found: list[str] = []
    nv = pathlib.Path(proc) / "driver" / "nvidia" / "gpus"
    if nv.is_dir():
        for info in sorted(nv.glob("*/information")):
            name = next(
                (ln.split(":", 1)[1].strip() for ln in _read(str(info)).splitlines() if ln.startswith("Model:")), ""
            )
            found.append(f"nvidia:{name or info.parent.name}")
    drm = pathlib.Path(sys_root) / "class" / "drm"
    if drm.is_dir():
        for card in sorted(drm.glob("card[0-9]*")):
            if "-" in card.name:  # connectors such as card0-HDMI-A-1
                continue
            vendor = _GPU_VENDORS.get(_read(str(card / "device" / "vendor")).strip())
            if vendor and not (vendor == "nvidia" and found):
                found.append(f"{vendor}:{card.name}")
    return tuple(found)


def engine_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for engine, dist in (("mnn", "mnn"), ("onnxruntime", "onnxruntime")):
        try:
            versions[engine] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    if "onnxruntime" not in versions:  # GPU builds ship under another distribution name
        for dist in ("onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"):
            try:
                versions["onnxruntime"] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


_GFLOPS_SNIPPET = """
import time, numpy as np
a = np.random.default_rng(0).random((192, 192), dtype=np.float32)
b = a.copy()
a @ b
best = float("inf")
for _ in range(7):
    t = time.perf_counter()
    for _ in range(8):
        a @ b
    best = min(best, (time.perf_counter() - t) / 8)
print(2 * 192 ** 3 / best / 1e9)
"""


def measure_gflops_per_core(*, timeout_s: float = 30.0) -> float:
    """fp32 matmul GFLOP/s of one core (numpy's BLAS pinned to one thread, in a child process)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _GFLOPS_SNIPPET], capture_output=True, text=True, timeout=timeout_s, env=env
        )
        return max(0.0, float(proc.stdout.strip().splitlines()[-1]))
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return 0.0


def collect(*, backends: Iterable[str] | None = None, measure: bool = True) -> DeviceProfile:
    """Profile this machine (blocking: a second or two; run it off the event loop).

    `backends` skips the probe when the caller already knows them (e.g. a simulated fleet).
    """
    from tether.agent import engine

    model, processors, flags = parse_cpuinfo(_read("/proc/cpuinfo"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or processors or 1)
    return DeviceProfile(
        arch=platform.machine(),
        cpu_model=model or platform.processor() or "unknown",
        cores=max(1, cores),
        simd=simd_flags(flags),
        memory_mb=parse_meminfo(_read("/proc/meminfo")),
        gpus=detect_gpus(),
        backends=tuple(engine.detect_backends() if backends is None else backends),
        engines=engine_versions(),
        gflops_per_core=measure_gflops_per_core() if measure else 0.0,
    )
