"""Aggregation at scale for `tether bench fl`: N updates x P float32 parameters, streaming fold vs NumPy.

The updates are written once to files (`prepare`: seeded, float32, one
tensor of P values, sample counts 1..100), as a worker finds them in the blob
store; each side then runs in a fresh child process (`python -m
tether.devtools.bench_fl_agg fold ...`) that reads the same files in the same
order and reports its time and its peak resident memory (`VmHWM`) and
resident memory just before the fold, so the figure is the fold's own memory
and not the interpreter's.

- tether: every update read into one reused buffer and through
  `tether.controller.fl.aggregators.MeanFold.add` (the checks of
  `updates.check` included), then `aggregators.finish` with FedAvg against a
  real float32 global model, `Deferred` as the Celery worker has it: its
  layout while folding, its values loaded at the server step (from a file,
  into a buffer of its own) and stepped in place. Its memory: the float64
  running sums (2x) and the update buffer (1x) while folding, then the sums
  and the global model (1x) once the buffer is released.
- numpy: the plain in-memory NumPy weighted mean, `np.einsum("i,ij->j",
  samples, np.stack(updates))`, over blocks of `block` updates (all N at once
  would need N x P x 4 bytes and more), the blocks' weighted sums added up.

Both write their mean; the parent checks they agree before reporting a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

TENSOR = "dense/kernel"


def prepare(directory: pathlib.Path, *, updates: int, params: int, seed: int) -> int:
    """Write `updates` float32 update files and their sample counts; the bytes of one update."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = rng.integers(1, 101, size=updates)
    np.save(directory / "samples.npy", samples)
    for i in range(updates):
        np.save(directory / f"u{i:05d}.npy", rng.standard_normal(params, dtype=np.float32) * np.float32(0.01))
    return params * 4


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    """This process's peak resident memory: VmHWM, the high-water mark of its own address space.

    Not `ru_maxrss`: Linux carries that across exec, so a child forked from a large parent reports the parent's
    size at fork time."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Loader:
    """np.load of the update files, its seconds counted apart (both sides read the same files)."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = directory
        self.seconds = 0.0

    def __call__(self, i: int) -> np.ndarray:
        started = time.perf_counter()
        out: np.ndarray = np.load(self.directory / f"u{i:05d}.npy")
        self.seconds += time.perf_counter() - started
        return out

    def into(self, i: int, buffer: np.ndarray) -> np.ndarray:
        """Read update i into `buffer` (same dtype and size) and return it: one update buffer for the whole run, as
        a worker streaming blobs would keep. (A fresh 4 MB array per update leaves freed blocks on glibc's heap once
        its mmap threshold has risen, and ru_maxrss would count that slack as if it were live.)"""
        started = time.perf_counter()
        with open(self.directory / f"u{i:05d}.npy", "rb") as f:
            version = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = header(f)
            if dtype != buffer.dtype or int(np.prod(shape)) != buffer.size or fortran:
                raise ValueError(f"update {i}: {dtype} {shape} does not fit the buffer")
            if f.readinto(buffer.view(np.uint8).data) != buffer.nbytes:
                raise ValueError(f"update {i} is truncated")
        self.seconds += time.perf_counter() - started
        return buffer.reshape(shape)


def fold_tether(directory: pathlib.Path, *, updates: int) -> tuple[np.ndarray, float]:
    """The round's mean update (the new global model is computed too) and the seconds spent reading files."""
    from tether.controller.fl import aggregators
    from tether.controller.fl import updates as fl_updates
    from tether.spec import strategies

    load = _Loader(directory)
    samples = np.load(directory / "samples.npy")
    first = np.load(directory / "u00000.npy", mmap_mode="r")
    shape = first.shape
    del first

    def load_global() -> dict[str, np.ndarray]:
        # The global model's values, every page touched, created only when the server step needs them (the worker
        # reads its blob into a buffer of its own at that point).
        return {TENSOR: np.full(shape, 0.5, dtype=np.float32)}

    layout = {TENSOR: np.broadcast_to(np.zeros((), np.float32), shape)}  # no memory: what the fold needs
    global_model = aggregators.Deferred(like=layout, load=load_global)
    fold = aggregators.MeanFold(like=global_model.like)
    buffer = np.empty(int(np.prod(shape)), dtype=np.float32)
    for i in range(updates):
        delta = load.into(i, buffer)
        fold.add(fl_updates.Update(device=f"device-{i:05d}", delta={TENSOR: delta}, samples=int(samples[i])))
        del delta
    del buffer  # the last update is folded: the new model takes its place
    outcome = aggregators.finish(
        strategies.FedAvg(), global_model=global_model, fold=fold, state=aggregators.ServerState()
    )
    assert outcome.model[TENSOR].dtype == np.float32
    return outcome.delta[TENSOR], load.seconds  # float64, saved as is: a float32 copy would add to the peak


def fold_numpy(directory: pathlib.Path, *, updates: int, block: int) -> tuple[np.ndarray, float]:
    """sum_i n_i x_i / sum_i n_i by `np.einsum` over stacked blocks of updates (float64 weights: numpy's fastest
    accurate form here; `np.average(stack, weights=...)` was slower), and the seconds spent reading files."""
    load = _Loader(directory)
    samples = np.load(directory / "samples.npy").astype(np.float64)
    total: np.ndarray | None = None
    for lo in range(0, updates, block):
        hi = min(updates, lo + block)
        stack = np.stack([load(i) for i in range(lo, hi)])
        part = np.einsum("i,ij->j", samples[lo:hi], stack)
        del stack
        total = part if total is None else total + part
    assert total is not None
    return (total / samples[:updates].sum()).astype(np.float32), load.seconds


def measure(
    directory: pathlib.Path, *, side: str, updates: int, block: int, python: str | None = None
) -> dict[str, Any]:
    """Run one side in a fresh process: seconds, peak and starting resident bytes; its mean in <side>.npy."""
    cmd = [python or sys.executable, "-m", "tether.devtools.bench_fl_agg", "fold", "--dir", str(directory)]
    cmd += ["--side", side, "--updates", str(updates), "--block", str(block)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"the {side} fold failed: {done.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def _fold_main(args: argparse.Namespace) -> int:
    directory = pathlib.Path(args.dir)
    import numpy  # noqa: F401  (imports before the baseline reading)

    if args.side == "tether":
        from tether.controller.fl import aggregators  # noqa: F401

    before = _rss_bytes()
    started = time.perf_counter()
    if args.side == "tether":
        mean, load_s = fold_tether(directory, updates=args.updates)
    else:
        mean, load_s = fold_numpy(directory, updates=args.updates, block=args.block)
    seconds = time.perf_counter() - started
    peak = _peak_bytes()
    np.save(directory / f"result-{args.side}.npy", mean)
    report = {"side": args.side, "seconds": seconds, "read_s": load_s, "rss_before": before, "peak_rss": peak}
    print(json.dumps(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One side of `tether bench fl`'s aggregation figure.")
    sub = parser.add_subparsers(dest="command", required=True)
    fold = sub.add_parser("fold")
    fold.add_argument("--dir", required=True)
    fold.add_argument("--side", choices=["tether", "numpy"], required=True)
    fold.add_argument("--updates", type=int, required=True)
    fold.add_argument("--block", type=int, default=100)
    args = parser.parse_args(argv)
    return _fold_main(args)


if __name__ == "__main__":
    sys.exit(main())
