"""Running a bundle's entrypoint: an isolated worker process with limits.

The daemon never executes bundle code itself. Most runs go to a warm worker
(`tether.agent.warmpool`, the same contract); `run_task` is the fresh path
(a bundle's `runtime.isolation: fresh`, `tether agent run --isolation
fresh`, a CPU-time limit where /proc is missing). It starts
`python -m tether.agent.taskworker <job dir>` in its own session (process group),
with an address-space limit (RLIMIT_AS, from the task's memoryMB) and, when
set, a CPU-time limit (RLIMIT_CPU, from cpuSeconds) that the worker applies to
itself before loading anything, and a wall-clock timeout (timeoutSeconds)
after which the whole process group is killed. The model is loaded inside the
worker. Job and answer travel as files in the job directory (native engine
libraries print to stdout, so stdout is only a log):

    job.json       what to run (written by the daemon)
    result.json    sample_count, metrics, counts, tensor names, new task state, backend
    tensors.npz    the result tensors (no pickles)
    error.json     type, message and traceback when `run` raised
    task.log       lines from ctx.log
    output.log     the worker's stdout and stderr

Whatever the worker wrote is re-validated here: it ran untrusted code.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from tether.agent import results
from tether.agent.tunnel import emitter
from tether.common import errors, manifest
from tether.spec import resources

MAX_LOG_LINES = 1000
MAX_LOG_BYTES = 64 * 1024
MAX_ANSWER_BYTES = 1024 * 1024
MAX_TENSORS_BYTES = 64 * 1024 * 1024
MAX_STATE_BYTES = 1024 * 1024
MAX_RESOURCES_BYTES = 64 * 1024
MAX_INPUTS_BYTES = 16 * 1024 * 1024  # ctx.inputs as JSON (stream windows are capped well below this)


@dataclasses.dataclass(frozen=True)
class TaskLimits:
    """Resources of one run (MLTask `spec.resources`); `cpu_seconds` None means no CPU-time limit.

    The agent's own limits (its `--task-*` flags) are the device's caps: a
    release's limits apply within them (`from_json(doc, caps=...)`).
    """

    timeout_s: float = 60.0
    memory_mb: int = 512
    cpu_seconds: int | None = None

    def __post_init__(self) -> None:
        if not (
            isinstance(self.timeout_s, int | float)
            and not isinstance(self.timeout_s, bool)
            and 0 < self.timeout_s <= 24 * 3600
        ):
            raise errors.InvalidArgument(f"timeout_s: {self.timeout_s!r} must be in (0, 86400]")
        if not (isinstance(self.memory_mb, int) and not isinstance(self.memory_mb, bool) and self.memory_mb >= 16):
            raise errors.InvalidArgument(f"memory_mb: {self.memory_mb!r} must be an integer >= 16")
        if self.cpu_seconds is not None and not (
            isinstance(self.cpu_seconds, int) and not isinstance(self.cpu_seconds, bool) and self.cpu_seconds >= 1
        ):
            raise errors.InvalidArgument(f"cpu_seconds: {self.cpu_seconds!r} must be an integer >= 1 (or unset)")

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | None, *, caps: TaskLimits | None = None) -> TaskLimits:
        """A release's limits (`{"timeoutSeconds", "memoryMB", "cpuSeconds"}`, each optional) within `caps`.

        Each limit is the smaller of what the release asks for and the device's
        cap; a limit the release leaves out is the cap. A document this agent
        cannot honour exactly (unknown key, wrong type, out of bounds) raises
        InvalidSpec naming the field: a limit is never silently dropped.
        """
        caps = caps or cls()
        if doc is not None and not isinstance(doc, Mapping):
            raise errors.InvalidSpec("must be a JSON object", field="resources")
        asked = resources.parse_resources(doc)  # the shared grammar: the bounds the controller validated
        timeout, memory, cpu = asked.timeout_seconds, asked.memory_mb, asked.cpu_seconds
        if caps.cpu_seconds is not None:
            cpu = caps.cpu_seconds if cpu is None else min(cpu, caps.cpu_seconds)
        return cls(
            timeout_s=caps.timeout_s if timeout is None else min(float(timeout), caps.timeout_s),
            memory_mb=caps.memory_mb if memory is None else min(memory, caps.memory_mb),
            cpu_seconds=cpu,
        )

    @classmethod
    def from_wire(cls, text: str, *, caps: TaskLimits | None = None) -> TaskLimits:
        """`from_json` of a DesiredTask's `resources_json` ("" means: the caps); InvalidSpec when malformed."""
        if not text.strip():
            return caps or cls()
        if len(text) > MAX_RESOURCES_BYTES:
            raise errors.InvalidSpec(f"document larger than {MAX_RESOURCES_BYTES} bytes", field="resources")
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise errors.InvalidSpec(f"not valid JSON: {e}", field="resources") from None
        if not isinstance(doc, dict):
            raise errors.InvalidSpec("must be a JSON object", field="resources")
        return cls.from_json(doc, caps=caps)


@dataclasses.dataclass
class TaskContext:
    """What `run(ctx)` gets (docs/internals.md, "Task API")."""

    model: Any  # engine.Model of the bundle's first engine; None when the bundle declares none
    data_dir: str
    state: dict[str, Any]
    bundle_dir: str
    log: Callable[[str], None]
    models: dict[str, Any] = dataclasses.field(default_factory=dict)  # every loaded model by bundle path
    # What the trigger hands the run (docs/task-api.md): "trigger", "match", "events", "aggregates", "payload".
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # ctx.emit(topic, payload) -> seq: a record for cloud consumers (the real-time tunnel, docs/task-api.md).
    emit: Callable[[str, Any], int] = emitter.unavailable


@dataclasses.dataclass(frozen=True)
class TaskOutcome:
    result: results.TaskResult
    state: dict[str, Any]
    duration_s: float
    backend: str
    logs: tuple[str, ...]


def _read_bounded(path: pathlib.Path, limit: int) -> bytes | None:
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        return None
    if len(data) > limit:
        raise errors.TaskFailed(f"worker wrote more than {limit} bytes to {path.name}")
    return data


def tail(path: pathlib.Path, limit: int = 4000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _read_logs(path: pathlib.Path) -> tuple[str, ...]:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_LOG_BYTES)
    except FileNotFoundError:
        return ()
    return tuple(data.decode("utf-8", "replace").splitlines()[:MAX_LOG_LINES])


def _load_tensors(path: pathlib.Path, names: list[str]) -> dict[str, np.ndarray]:
    if not names:
        return {}
    if not path.is_file() or path.stat().st_size > MAX_TENSORS_BYTES:
        raise errors.TaskFailed("worker result tensors are missing or too large")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if sorted(npz.files) != sorted(names):
                raise errors.TaskFailed("worker result tensors do not match their names")
            return {n: npz[n] for n in names}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise errors.TaskFailed(f"worker result tensors are unreadable: {e}") from None


def _decode_answer(job_dir: pathlib.Path) -> tuple[results.TaskResult, dict[str, Any], str]:
    raw = _read_bounded(job_dir / "result.json", MAX_ANSWER_BYTES + MAX_STATE_BYTES)
    if raw is None:
        raise errors.TaskFailed("worker exited without a result")
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise errors.TaskFailed(f"worker result is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise errors.TaskFailed("worker result must be a JSON object")
    names = doc.get("tensors") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise errors.TaskFailed("worker result tensors must be a list of names")
    state = doc.get("state") or {}
    if not isinstance(state, dict):
        raise errors.TaskFailed("ctx.state must stay a dict")
    if len(json.dumps(state)) > MAX_STATE_BYTES:
        raise errors.TaskFailed(f"ctx.state is larger than {MAX_STATE_BYTES} bytes")
    result = results.validate(
        {
            "sample_count": doc.get("sample_count"),
            "metrics": doc.get("metrics") or {},
            "counts": doc.get("counts") or {},
            "tensors": _load_tensors(job_dir / "tensors.npz", names),
        }
    )
    backend = doc.get("backend")
    return result, state, backend[:64] if isinstance(backend, str) else ""


def _failure(job_dir: pathlib.Path, returncode: int, limits: TaskLimits) -> errors.TaskFailed:
    if returncode == -signal.SIGXCPU and limits.cpu_seconds is not None:
        return errors.TaskFailed(
            f"task exceeded its CPU-time limit of {limits.cpu_seconds}s and was killed (SIGXCPU)\n"
            f"{tail(job_dir / 'output.log')}".rstrip()
        )
    raw = _read_bounded(job_dir / "error.json", MAX_ANSWER_BYTES)
    if raw is not None:
        with contextlib.suppress(json.JSONDecodeError, TypeError, AttributeError):
            doc = json.loads(raw)
            return errors.TaskFailed(f"{doc['type']}: {doc['message']}\n{doc.get('traceback', '')}".rstrip())
    if returncode < 0:
        with contextlib.suppress(ValueError):
            name = signal.Signals(-returncode).name
            return errors.TaskFailed(f"worker killed by {name}\n{tail(job_dir / 'output.log')}".rstrip())
    return errors.TaskFailed(f"worker exited with status {returncode}\n{tail(job_dir / 'output.log')}".rstrip())


def check_inputs(inputs: Mapping[str, Any] | None) -> dict[str, Any]:
    """`ctx.inputs` must be JSON-able and bounded: a TaskFailed saying why, before any worker starts."""
    try:
        text = json.dumps(dict(inputs or {}), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise errors.TaskFailed(f"task inputs are not JSON-able: {e}") from None
    if len(text) > MAX_INPUTS_BYTES:
        raise errors.TaskFailed(f"task inputs are {len(text)} bytes; the limit is {MAX_INPUTS_BYTES}")
    return dict(inputs or {})


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


def worker_env(threads: int) -> dict[str, str]:
    """A task worker's environment: the agent's, with the worker's footprint kept proportional to its work
    (as many BLAS threads as its engine threads, few malloc arenas)."""
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "OPENBLAS_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "MALLOC_ARENA_MAX": "2",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONNOUSERSITE": "1",
        }
    )
    return env


async def run_task(
    *,
    bundle_dir: str | os.PathLike[str],
    bundle: manifest.Manifest,
    data_dir: str | os.PathLike[str],
    state: Mapping[str, Any] | None = None,
    limits: TaskLimits = TaskLimits(),
    backend: str = "cpu",
    threads: int = 1,
    work_dir: str | os.PathLike[str] | None = None,
    selection: Mapping[str, Any] | None = None,
    inputs: Mapping[str, Any] | None = None,
    emit: Mapping[str, Any] | None = None,
) -> TaskOutcome:
    """Run `bundle`'s entrypoint once in a fresh worker process; raise TaskFailed on any failure.

    `selection` (from `backends.Selector.choices`) maps a model to the file and
    candidate backend selection chose for it; other models load on `backend`/`threads`.
    `inputs` (JSON-able, at most MAX_INPUTS_BYTES encoded) becomes `ctx.inputs`.
    `emit` (`tunnel.relay.Tunnel.grant`) lets `ctx.emit` reach the agent's tunnel.
    """
    inputs_doc = check_inputs(inputs)
    bundle_dir = pathlib.Path(bundle_dir).resolve()
    job_dir = pathlib.Path(tempfile.mkdtemp(prefix="tether-job-", dir=work_dir))
    try:
        job = {
            "bundle_dir": str(bundle_dir),
            "entrypoint": bundle.entrypoint,
            "engines": [e.to_json() for e in bundle.engines],
            "data_dir": str(pathlib.Path(data_dir).resolve()),
            "state": dict(state or {}),
            "memory_mb": limits.memory_mb,
            "cpu_seconds": limits.cpu_seconds,
            "backend": backend,
            "threads": int(threads),
            "selection": dict(selection or {}),
            "inputs": inputs_doc,
            "emit": dict(emit) if emit else None,
        }
        (job_dir / "job.json").write_text(json.dumps(job))
        env = worker_env(threads)
        started = time.monotonic()
        with (job_dir / "output.log").open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tether.agent.taskworker",
                str(job_dir),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                cwd=str(job_dir),
                env=env,
                start_new_session=True,
            )
        try:
            returncode = await asyncio.wait_for(proc.wait(), timeout=limits.timeout_s)
        except TimeoutError:
            _kill_group(proc)
            await proc.wait()
            raise errors.TaskFailed(f"task timed out after {limits.timeout_s:g}s and was killed") from None
        except BaseException:  # cancelled (agent shutting down): never leave a worker behind
            _kill_group(proc)
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.wait())
            raise
        finally:
            # Whatever the entrypoint started in the worker's session dies with it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        duration = time.monotonic() - started
        if returncode != 0:
            raise _failure(job_dir, returncode, limits)
        result, new_state, real_backend = _decode_answer(job_dir)
        if not math.isfinite(duration):
            duration = 0.0
        return TaskOutcome(
            result=result,
            state=new_state,
            duration_s=duration,
            backend=real_backend,
            logs=_read_logs(job_dir / "task.log"),
        )
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
