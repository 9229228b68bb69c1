"""Warm task workers: one resident, isolated worker per active task version, forked from the zygote.

A fresh interpreter per run (`runtime.run_task`) costs an interpreter start,
the numpy and engine imports and the model load on every trigger; Walle keeps
tasks resident instead. `WorkerPool.run` hands a run to the warm worker of
its task version (`tether.agent.warmworker`: bundle imported, models loaded on
the selected backend), starting one from the zygote (`tether.agent.zygote`)
when there is none. Every worker has its own session and the task's
address-space limit; the agent keeps the wall-clock timeout, watches the
per-run CPU time (`/proc/<pid>/stat`: a resident worker's RLIMIT_CPU would
count every run it ever served) and kills the worker's whole process group
with the reason in the run's `TaskFailed` when:

- the run outlives `timeoutSeconds` (a hang, a busy loop), or its CPU time passes `cpuSeconds`;
- the worker dies (a crash; its exit status comes from the zygote) or closes its channel;
- it writes something that is not a frame of the protocol, or answers another run;
- it hit its memory limit (MemoryError: it may be damaged) or grew past the warm-memory budget;
- it started a process (`/proc/<pid>/task/*/children`): a resident worker must not leave any behind.

Only that worker goes; the next run of the task starts another after an
exponential backoff (0.5 s doubling to 30 s while starts keep failing). A
newer version's worker starts ahead of its first run where there is room
(`prewarm`, when the runner arms its trigger) or with it, and the older
version's workers retire once their runs end (drained). Workers idle longer than `idle_s` retire; so
do the least recently used ones when more than `max_workers` are resident or
their resident memory passes `memory_budget` (a run that finds no room gets
a worker of its own that retires after it: a cold run).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Mapping
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from tether.agent import frames, results, runtime, warmworker
from tether.agent import zygote as zygote_mod
from tether.common import errors, manifest

WORKER_DIR_PREFIX = "tether-worker-"
log = logging.getLogger(__name__)

BUFFER_BYTES = results.MAX_TOTAL_ELEMENTS * 8 + results.MAX_TENSORS * warmworker.ALIGN
MAX_LOG_FILE_BYTES = 1024 * 1024
BACKOFF_BASE_S, BACKOFF_MAX_S = 0.5, 30.0
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclasses.dataclass(frozen=True)
class PoolSettings:
    """`tether agent run --warm-workers / --warm-memory-budget / --worker-idle-seconds`."""

    max_workers: int = 8
    memory_budget: int | None = 1024 * 1024 * 1024  # resident bytes of idle warm workers; None: no budget
    idle_s: float = 300.0


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads), None where /proc cannot say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (any of its threads); empty where /proc cannot say."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found.extend(int(c) for c in f.read().split())
    return found


class WarmWorker:
    """One forked worker serving one task version; a run at a time."""

    def __init__(
        self,
        *,
        key: tuple[str, int],
        pid: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        buffer: shared_memory.SharedMemory,
        log_path: pathlib.Path,
        backend: str,
    ) -> None:
        self.key, self.pid, self.backend = key, pid, backend
        self._reader, self._writer, self._buffer, self._log_path = reader, writer, buffer, log_path
        self._view = buffer.buf if buffer.buf is not None else memoryview(b"")
        self.busy = False
        self.dead: str | None = None  # why it was killed, or None while it serves
        self.last_used = time.monotonic()
        self.rss = 0
        self._runs = 0

    @property
    def gone(self) -> bool:
        """Killed, or its channel closed while it was idle (it crashed, or something outside killed it)."""
        return self.dead is not None or (not self.busy and self._reader.at_eof())

    def kill(self, reason: str) -> None:
        if self.dead is None:
            self.dead = reason
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self._writer.close()
        with contextlib.suppress(Exception):
            self._view.release()
            self._buffer.close()
        shutil.rmtree(self._log_path.parent, ignore_errors=True)  # its directory: the log and its cwd

    def log_tail(self, limit: int = 4000) -> str:
        return runtime.tail(self._log_path, limit)

    async def run(
        self,
        *,
        state: Mapping[str, Any],
        inputs: Mapping[str, Any],
        limits: runtime.TaskLimits,
        zygote: zygote_mod.Zygote,
        emit: Mapping[str, Any] | None = None,
    ) -> runtime.TaskOutcome:
        self.busy, self._runs = True, self._runs + 1
        started = time.monotonic()
        watch = None
        try:
            self._writer.write(
                frames.encode(
                    {
                        "op": "run",
                        "id": self._runs,
                        "state": dict(state),
                        "inputs": dict(inputs),
                        "emit": dict(emit) if emit else None,  # ctx.emit's grant (tunnel.relay.Tunnel.grant)
                    }
                )
            )
            if limits.cpu_seconds is not None:
                watch = asyncio.create_task(self._watch_cpu(limits.cpu_seconds))
            answer = await asyncio.wait_for(frames.read_frame_async(self._reader), timeout=limits.timeout_s)
        except TimeoutError:
            self.kill(f"task timed out after {limits.timeout_s:g}s and was killed")
            raise errors.TaskFailed(self.dead or "") from None
        except frames.FrameError as e:
            if self.dead is not None:  # killed by the CPU watch
                raise errors.TaskFailed(self.dead) from None
            reason = await self.death(zygote, str(e))
            raise errors.TaskFailed(reason) from None
        except BaseException:
            self.kill("cancelled: the agent is stopping")
            raise
        finally:
            if watch is not None:
                watch.cancel()
            self.busy, self.last_used = False, time.monotonic()
        if answer.get("id") != self._runs or answer.get("op") not in ("result", "error"):
            self.kill(f"worker broke the protocol: answered {errors.excerpt(answer, limit=200)}")
            raise errors.TaskFailed(self.dead or "")
        if spawned := children(self.pid):
            self.kill(f"task started processes {spawned[:8]}; a warm worker may not fork, so it was killed")
            raise errors.TaskFailed(self.dead or "")
        self.rss = rss_bytes(self.pid)
        self._trim_log()
        logs = tuple(str(line) for line in (answer.get("logs") or [])[: runtime.MAX_LOG_LINES])
        if answer["op"] == "error":
            message = f"{answer.get('type')}: {answer.get('message')}\n{answer.get('traceback', '')}".rstrip()
            if answer.get("fatal"):
                self.kill(f"{message}\n(the worker hit its memory limit and was replaced)")
            raise errors.TaskFailed(message[:12000])
        try:
            result, new_state = self._decode(answer)
        except errors.TaskFailed as e:
            self.kill(str(e))
            raise
        return runtime.TaskOutcome(
            result=result, state=new_state, duration_s=time.monotonic() - started, backend=self.backend, logs=logs
        )

    def _decode(self, doc: dict[str, Any]) -> tuple[results.TaskResult, dict[str, Any]]:
        state = doc.get("state") or {}
        if not isinstance(state, dict):
            raise errors.TaskFailed("ctx.state must stay a dict")
        if len(json.dumps(state)) > runtime.MAX_STATE_BYTES:
            raise errors.TaskFailed(f"ctx.state is larger than {runtime.MAX_STATE_BYTES} bytes")
        layout = doc.get("tensors") or []
        if not isinstance(layout, list) or len(layout) > results.MAX_TENSORS:
            raise errors.TaskFailed("worker result tensors must be a list of at most 64 layouts")
        tensors: dict[str, np.ndarray] = {}
        for item in layout:
            try:
                name, offset = str(item["name"]), int(item["offset"])
                shape = tuple(int(d) for d in item["shape"])
                count = int(np.prod(shape, dtype=np.int64)) if shape else 1
                if item["dtype"] != "<f8" or offset < 0 or min(shape, default=0) < 0:
                    raise ValueError("bad dtype, offset or shape")
                if count > results.MAX_TENSOR_ELEMENTS or offset + count * 8 > BUFFER_BYTES:
                    raise ValueError("outside the result buffer")
                tensors[name] = np.frombuffer(self._view, dtype="<f8", count=count, offset=offset).reshape(shape).copy()
            except (KeyError, TypeError, ValueError) as e:
                raise errors.TaskFailed(
                    f"worker result tensor layout is invalid: {errors.excerpt(item, limit=200)} ({e})"
                ) from None
        result = results.validate(
            {
                "sample_count": doc.get("sample_count"),
                "metrics": doc.get("metrics") or {},
                "counts": doc.get("counts") or {},
                "tensors": tensors,
            }
        )
        return result, state

    async def _watch_cpu(self, limit: int) -> None:
        start = cpu_seconds(self.pid)
        if start is None:
            return
        cores = os.cpu_count() or 1
        while True:
            used = (cpu_seconds(self.pid) or start) - start
            if used >= limit:
                self.kill(f"task exceeded its CPU-time limit of {limit}s and was killed")
                return
            await asyncio.sleep(max(0.05, (limit - used) / cores))

    async def death(self, zygote: zygote_mod.Zygote, what: str) -> str:
        status = await zygote.exit_status(self.pid)
        if status is None:
            why = f"worker {what}"
        elif status < 0:
            try:
                why = f"worker killed by {signal.Signals(-status).name} ({what})"
            except ValueError:
                why = f"worker killed by signal {-status} ({what})"
        else:
            why = f"worker exited with status {status} ({what})"
        reason = f"{why}\n{self.log_tail()}".rstrip()
        self.kill(reason)
        return reason

    def _trim_log(self) -> None:
        with contextlib.suppress(OSError):
            if self._log_path.stat().st_size > MAX_LOG_FILE_BYTES:
                os.truncate(self._log_path, 0)  # opened O_APPEND by the worker: it writes on from the start


@functools.lru_cache(maxsize=4096)
def _resolved(path: str) -> pathlib.Path:
    """An install's real path (a dozen system calls): installs do not move, and a run is in a hurry."""
    return pathlib.Path(path).resolve()


def _backoff(failures: int) -> float:
    return 0.0 if failures <= 0 else min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (failures - 1))


class WorkerPool:
    """Warm workers of every active task version on this device (or a simulated fleet: one pool shared)."""

    def __init__(
        self, *, work_dir: str | os.PathLike[str], threads: int = 1, settings: PoolSettings = PoolSettings()
    ) -> None:
        self.settings = settings
        self.zygote = zygote_mod.Zygote(threads=threads)
        self._work_dir = pathlib.Path(work_dir)
        self._workers: dict[tuple[str, int], list[WarmWorker]] = {}
        self._failures: dict[tuple[str, int], tuple[int, float]] = {}  # key -> (deaths in a row, no start before)
        self._draining: set[WarmWorker] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._starting: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._swept = False
        self.cold_runs = 0

    @staticmethod
    def supports(limits: runtime.TaskLimits) -> bool:
        """A CPU-time limit needs the per-run watch, which needs /proc; elsewhere such a task runs fresh."""
        return limits.cpu_seconds is None or cpu_seconds(os.getpid()) is not None

    def workers(self) -> list[WarmWorker]:
        return [w for ws in self._workers.values() for w in ws]

    async def run(
        self,
        *,
        release: str,
        version: int,
        bundle_dir: str | os.PathLike[str],
        bundle: manifest.Manifest,
        data_dir: str | os.PathLike[str],
        state: Mapping[str, Any] | None = None,
        limits: runtime.TaskLimits = runtime.TaskLimits(),
        backend: str = "cpu",
        threads: int = 1,
        selection: Mapping[str, Any] | None = None,
        inputs: Mapping[str, Any] | None = None,
        emit: Mapping[str, Any] | None = None,
    ) -> runtime.TaskOutcome:
        """`runtime.run_task`'s contract, on the task version's warm worker; TaskFailed says why a run failed."""
        inputs_doc = runtime.check_inputs(inputs)
        key, job = self._job(release, version, bundle_dir, bundle, data_dir, limits, backend, threads, selection)
        worker, cold = await self._acquire(key, job, limits)
        try:
            outcome = await worker.run(
                state=dict(state or {}), inputs=inputs_doc, limits=limits, zygote=self.zygote, emit=emit
            )
        except errors.TaskFailed:
            if worker.dead is not None:
                self._died(key)
            raise
        finally:
            if cold or worker.dead is not None or worker in self._draining:
                self._retire(worker)
            else:
                self._enforce_budget()
        self._failures.pop(key, None)
        return outcome

    def prewarm(
        self,
        *,
        release: str,
        version: int,
        bundle_dir: str | os.PathLike[str],
        bundle: manifest.Manifest,
        data_dir: str | os.PathLike[str],
        limits: runtime.TaskLimits = runtime.TaskLimits(),
        backend: str = "cpu",
        threads: int = 1,
        selection: Mapping[str, Any] | None = None,
    ) -> bool:
        """Start the version's worker ahead of its first run, where there is room without evicting anyone.

        An upgrade swaps this way: the new version's worker starts, the old
        version's retire as their runs end. Returns whether a start began; a
        start that fails is only logged (the first run will try, and report).
        """
        key, job = self._job(release, version, bundle_dir, bundle, data_dir, limits, backend, threads, selection)
        if (
            key in self._workers
            or key in self._starting
            or len(self.workers()) + len(self._starting) >= self.settings.max_workers
            or self._failures.get(key, (0, 0.0))[1] > time.monotonic()
        ):
            return False
        self._starting[key] = asyncio.create_task(self._prewarm(key, job, limits), name=f"prewarm:{key[0]}")
        return True

    async def _prewarm(self, key: tuple[str, int], job: dict[str, Any], limits: runtime.TaskLimits) -> None:
        try:
            worker = await self._spawn(key, job, limits)
        except errors.TaskFailed as e:
            log.info("%s v%d: warm worker did not start ahead of its run: %s", key[0], key[1], str(e).splitlines()[0])
            return
        finally:
            self._starting.pop(key, None)
        self._workers.setdefault(key, []).append(worker)

    def _job(
        self,
        release: str,
        version: int,
        bundle_dir: str | os.PathLike[str],
        bundle: manifest.Manifest,
        data_dir: str | os.PathLike[str],
        limits: runtime.TaskLimits,
        backend: str,
        threads: int,
        selection: Mapping[str, Any] | None,
    ) -> tuple[tuple[str, int], dict[str, Any]]:
        """The worker key (release in one agent's store, version) and its job; older versions drain."""
        bundle_dir = _resolved(os.fspath(bundle_dir))
        scope = f"{release}@{bundle_dir.parent}"  # one agent's release (a fleet shares the pool)
        self._drain(scope, version)
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap_idle(), name="warm-workers-idle")
        job = {
            "bundle_dir": str(bundle_dir),
            "entrypoint": bundle.entrypoint,
            "engines": [e.to_json() for e in bundle.engines],
            "data_dir": str(_resolved(os.fspath(data_dir))),
            "memory_mb": limits.memory_mb,
            "backend": backend,
            "threads": int(threads),
            "selection": dict(selection or {}),
            "buffer_bytes": BUFFER_BYTES,
        }
        return (scope, version), job

    async def _acquire(
        self, key: tuple[str, int], job: dict[str, Any], limits: runtime.TaskLimits
    ) -> tuple[WarmWorker, bool]:
        if (starting := self._starting.get(key)) is not None:
            await asyncio.shield(starting)  # a worker starting ahead of this run: take it rather than a second
        for w in list(self._workers.get(key, [])):
            if w.gone:  # died while idle: not this run's failure; it gets another
                self._retire(w)
            elif not w.busy:
                w.busy = True
                return w, False
        _, not_before = self._failures.get(key, (0, 0.0))
        if (wait := not_before - time.monotonic()) > 0:
            await asyncio.sleep(wait)  # backoff: this task's workers keep dying
        cold = not self._make_room()
        worker = await self._spawn(key, job, limits)
        worker.busy = True
        if cold:
            self.cold_runs += 1
        else:
            self._workers.setdefault(key, []).append(worker)
        return worker, cold

    def _make_room(self) -> bool:
        """Retire least recently used idle workers until one more fits; False when none can (all busy)."""
        while len(self.workers()) >= self.settings.max_workers:
            idle = [w for w in self.workers() if not w.busy]
            if not idle:
                return False
            self._retire(min(idle, key=lambda w: w.last_used))
        return self.settings.max_workers > 0

    async def _spawn(self, key: tuple[str, int], job: dict[str, Any], limits: runtime.TaskLimits) -> WarmWorker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        buffer = shared_memory.SharedMemory(create=True, size=BUFFER_BYTES)
        if not self._swept:  # directories of workers of an agent that was killed: nothing uses them now
            self._swept = True
            for old in self._work_dir.glob(f"{WORKER_DIR_PREFIX}*"):
                shutil.rmtree(old, ignore_errors=True)
        # The worker's own directory: its cwd (as a fresh worker's job directory) and its output log.
        home = pathlib.Path(tempfile.mkdtemp(prefix=WORKER_DIR_PREFIX, dir=self._work_dir))
        log_path = home / "output.log"
        log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        job = {**job, "cwd": str(home)}
        try:
            pid = await self.zygote.spawn(job, [theirs.fileno(), buffer._fd, log_fd])  # type: ignore[attr-defined]
        except BaseException:
            ours.close()
            buffer.close()
            shutil.rmtree(home, ignore_errors=True)
            raise
        finally:
            theirs.close()
            os.close(log_fd)
            buffer.unlink()  # the worker holds it by descriptor: no name is left to leak
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=frames.MAX_FRAME_BYTES)
        worker = WarmWorker(
            key=key, pid=pid, reader=reader, writer=writer, buffer=buffer, log_path=log_path, backend=""
        )
        try:
            hello = await asyncio.wait_for(frames.read_frame_async(reader), timeout=limits.timeout_s)
        except TimeoutError:
            worker.kill(f"task worker did not load within {limits.timeout_s:g}s and was killed")
            self._died(key)
            raise errors.TaskFailed(worker.dead or "") from None
        except frames.FrameError as e:
            self._died(key)
            raise errors.TaskFailed(await worker.death(self.zygote, str(e))) from None
        except BaseException:
            worker.kill("cancelled")
            raise
        if hello.get("op") != "ready":
            worker.kill("worker could not load the task")
            self._died(key)
            message = f"{hello.get('type')}: {hello.get('message')}\n{hello.get('traceback', '')}".rstrip()
            raise errors.TaskFailed(message[:12000])
        worker.backend = str(hello.get("backend", ""))[:64]
        return worker

    def _died(self, key: tuple[str, int]) -> None:
        deaths = self._failures.get(key, (0, 0.0))[0] + 1
        self._failures[key] = (deaths, time.monotonic() + _backoff(deaths))

    def _retire(self, worker: WarmWorker) -> None:
        worker.kill(worker.dead or "retired")
        self._draining.discard(worker)
        ws = self._workers.get(worker.key, [])
        if worker in ws:
            ws.remove(worker)
            if not ws:
                del self._workers[worker.key]

    def _drain(self, scope: str, version: int) -> None:
        """A newer (or rolled-back) version runs: the other versions' workers go once idle."""
        for key in [k for k in self._workers if k[0] == scope and k[1] != version]:
            for w in list(self._workers[key]):
                if w.busy:
                    self._draining.add(w)
                else:
                    self._retire(w)

    def _enforce_budget(self) -> None:
        budget = self.settings.memory_budget
        if budget is None:
            return
        while sum(w.rss for w in self.workers()) > budget:
            idle = [w for w in self.workers() if not w.busy]
            if not idle:
                return
            self._retire(min(idle, key=lambda w: w.last_used))

    def retire_idle(self, *, now: float | None = None) -> int:
        """Retire workers idle for `idle_s` or more; how many went."""
        now = time.monotonic() if now is None else now
        old = [w for w in self.workers() if not w.busy and now - w.last_used >= self.settings.idle_s]
        for w in old:
            self._retire(w)
        return len(old)

    def retire_release(self, release: str, *, state_dir: str | os.PathLike[str]) -> None:
        """An uninstalled release of the agent at `state_dir`: its workers go (busy ones after their run)."""
        prefix = f"{release}@{pathlib.Path(state_dir).resolve()}{os.sep}"
        for key in [k for k in self._workers if k[0].startswith(prefix)]:
            for w in list(self._workers[key]):
                self._draining.add(w) if w.busy else self._retire(w)

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(max(0.5, min(self.settings.idle_s, 60.0) / 2))
            self.retire_idle()

    async def close(self) -> None:
        for starting in list(self._starting.values()):
            starting.cancel()
        await asyncio.gather(*self._starting.values(), return_exceptions=True)
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(BaseException):
                await self._reaper
        for w in self.workers() + list(self._draining):
            w.kill("the agent is stopping")
        self._workers.clear()
        self._draining.clear()
        await self.zygote.close()
