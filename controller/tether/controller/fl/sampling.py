"""Seeded per-round participant sampling: which eligible devices take part in round r of a task.

Each device gets a key, the first 64 bits of sha256(seed NUL task NUL round NUL
device id), and a round takes the k devices with the smallest keys. So:

- a run is reproducible: the same seed, task, round and eligible set give the
  same participants, whatever order the devices were listed in and on
  whichever controller replica decides;
- rounds are independent draws (the round number is hashed in), each device
  equally likely, without replacement within a round;
- nothing needs to be stored to redo a draw, and a benchmark can fix the
  sequence for two systems by using the same keys.

Only devices that are eligible are passed in: targeted, reached by the
rollout, connected, and whose participation conditions hold (the caller's
query). Pure: hashlib only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def key(*, seed: int, task: str, round_number: int, device: str) -> int:
    """The device's sampling key for one round (smaller is picked first)."""
    text = f"{seed}\0{task}\0{round_number}\0{device}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big")


def sample(*, eligible: Iterable[str], k: int, seed: int, task: str, round_number: int) -> tuple[str, ...]:
    """The min(k, n) eligible devices with the smallest keys, in key order (duplicates counted once)."""
    if k < 0:
        raise ValueError(f"k must be at least 0, got {k}")
    devices = set(eligible)
    ranked = sorted(devices, key=lambda d: (key(seed=seed, task=task, round_number=round_number, device=d), d))
    return tuple(ranked[:k])
