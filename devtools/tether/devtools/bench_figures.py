"""The figures of `tether bench fleet`: percentiles, ratios, bytes and messages counted, the polling model, modes.

Kept apart from the run (`bench_fleet`) so that they are tested on their own and the run stays readable.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

DEVICE_PREFIX = "/tether.v1.DeviceService/"


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50 / p90 / p100 by nearest rank (an empty sample gives NaN-free zeros and n=0)."""
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p100": 0.0, "n": 0}
    s = sorted(values)

    def rank(q: float) -> float:
        return s[min(len(s) - 1, max(0, int(-(-q * len(s) // 1)) - 1))]

    return {"p50": round(rank(0.5), 4), "p90": round(rank(0.9), 4), "p100": round(s[-1], 4), "n": len(s)}


def device_bytes(before: Any, after: Any) -> int:
    """Serialized bytes both ways on device RPCs between two ServerStats."""
    return _device_sum(after, "bytes") - _device_sum(before, "bytes")


def device_messages(before: Any, after: Any) -> int:
    return _device_sum(after, "messages") - _device_sum(before, "messages")


def _device_sum(stats: Any, what: str) -> int:
    total = 0
    for r in stats.rpcs:
        if r.method.startswith(DEVICE_PREFIX):
            if what == "bytes":
                total += r.request_bytes + r.response_bytes
            else:
                total += r.request_messages + r.response_messages
    return total


def modelled_polling_install(*, interval_s: float, pull_s: Sequence[float], n: int, seed: int = 0) -> dict[str, float]:
    """Install times of `n` devices polling every `interval_s` at uniform phases: phase + a measured pull time."""
    rng = random.Random(seed)
    pulls = list(pull_s) or [0.0]
    return percentiles([rng.uniform(0, interval_s) + rng.choice(pulls) for _ in range(n)])


def machine_busy_s() -> float:
    """CPU seconds this machine spent busy (all processes, all cores) since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else float("inf")


def compare_modes(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One document for a `--blobs both` run: each mode's JSON under its name, and the http/grpc ratios."""
    grpc_run, http_run = results["grpc"], results["http"]
    key = "controller_cpu_s_per_install"
    cpu_ratio = ratio(http_run.get(key, 0.0), grpc_run.get(key, 0.0))
    return {
        "blobs": "both",
        "grpc": dict(grpc_run),
        "http": dict(http_run),
        "cpu_per_install_ratio": cpu_ratio,
        "bytes_per_install_ratio": ratio(
            http_run.get("controller_bytes_per_install", 0), grpc_run.get("controller_bytes_per_install", 0)
        ),
        "install_p50_ratio": ratio(
            http_run.get("install_s", {}).get("p50", 0.0), grpc_run.get("install_s", {}).get("p50", 0.0)
        ),
        "goals": {"cpu_per_install_ratio_le_0.3": cpu_ratio <= 0.3},
    }
