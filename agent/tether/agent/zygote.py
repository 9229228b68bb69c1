"""The zygote: a pre-started parent that task workers are forked from (as Android starts its apps).

`python -m tether.agent.zygote <fd>` is started once by the agent (with a
task worker's environment: one BLAS thread, few malloc arenas) and imports
numpy, MNN and the worker code up front, so a forked worker pays neither an
interpreter start nor those imports. It stays single-threaded (nothing it
imports starts a thread; a test checks it), which is what makes `os.fork`
safe here.

It speaks frames (`tether.agent.frames`) over the unix socket `<fd>`:

    agent -> {"op": "spawn", "id", "job"} with three descriptors (SCM_RIGHTS):
             the worker's channel, its result buffer, its log file
    zygote -> {"op": "spawned", "id", "pid"} | {"op": "exited", "pid", "status"} (from waitpid)

The child, before any task code: a new session (`setsid`, so the agent can
kill its whole process group), the channel on fd 3, the buffer on fd 4,
stdout and stderr on the log, stdin on /dev/null, every other descriptor
closed, default signal handlers, the address-space limit and no core dumps,
then `tether.agent.warmworker.serve`. The zygote never runs task code
itself, and dies with the agent: its socket closes and it exits.

`Zygote` is the agent's end: it starts the zygote on first use (and again if
it died; workers already forked carry on), sends spawn requests and keeps
the exit statuses the zygote reports, for the reason a run failed.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import importlib
import os
import select
import signal
import socket
import sys
from collections.abc import Mapping
from typing import Any

from tether.agent import frames, runtime
from tether.common import errors

# Not onnxruntime: its native module starts a thread as it loads (1.32), and a fork from a process with
# other threads can inherit a lock held by one of them. A worker that needs it imports it (about 60 ms
# once numpy is in), and `test_warm_workers` checks that the zygote has one thread.
PRELOAD = (
    "numpy",
    "MNN",
    "tether.agent.engine",
    "tether.agent.backends",
    "tether.agent.results",  # protobuf: about 80 ms a child would pay again
    "tether.agent.runtime",
    "tether.agent.taskworker",
    "tether.agent.warmworker",
)
MAX_SPAWN_BYTES = 1024 * 1024
EXIT_STATUS_WAIT_S = 5.0


def preload() -> list[str]:
    """Import what every worker needs; the modules that are missing on this device (an engine) are skipped."""
    missing = []
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def _child(sock: socket.socket, wakeup: tuple[int, int], fds: list[int], job: dict[str, Any]) -> int:
    from tether.agent import taskworker, warmworker

    sock.detach()  # never closed through the object: the descriptor is closed below with the rest
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    channel, buffer, log = fds
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    # Move the two descriptors the worker keeps to 3 and 4, out of the way of each other first.
    high_channel, high_buffer = os.dup(channel), os.dup(buffer)
    os.dup2(high_channel, warmworker.CHANNEL_FD)
    os.dup2(high_buffer, warmworker.BUFFER_FD)
    os.closerange(warmworker.BUFFER_FD + 1, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 65536)
    os.chdir(job["cwd"])  # its own empty directory, as a fresh worker's job directory
    del wakeup  # closed with the rest
    taskworker.limit_memory(int(job["memory_mb"]))
    return warmworker.serve(job)


def _recv(sock: socket.socket, fds: list[int]) -> bytes:
    data, ancillary, _flags, _addr = sock.recvmsg(1 << 16, socket.CMSG_SPACE(16 * array.array("i").itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[: len(payload) - (len(payload) % got.itemsize)])
            fds.extend(got)
    return data


def serve(sock: socket.socket) -> int:
    """Fork workers on request and report their exits until the agent closes the socket."""
    wakeup_r, wakeup_w = os.pipe()
    os.set_blocking(wakeup_w, False)
    os.set_blocking(wakeup_r, False)
    signal.set_wakeup_fd(wakeup_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup pipe is what matters
    buffer, fds = b"", list[int]()
    while True:
        ready: list[int] = []
        with contextlib.suppress(InterruptedError):
            ready, _, _ = select.select([sock.fileno(), wakeup_r], [], [])
        if wakeup_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wakeup_r, 4096)
        _reap(sock)
        if sock.fileno() not in ready:
            continue
        data = _recv(sock, fds)
        if not data:
            return 0  # the agent is gone: so are we (its workers are killed by it, or orphaned and exit on EOF)
        buffer += data
        while len(buffer) >= frames.HEADER.size:
            (length,) = frames.HEADER.unpack_from(buffer)
            frames.check_length(length, MAX_SPAWN_BYTES)
            if len(buffer) < frames.HEADER.size + length:
                break
            request = frames.decode(buffer[frames.HEADER.size : frames.HEADER.size + length])
            buffer = buffer[frames.HEADER.size + length :]
            mine, fds = fds[:3], fds[3:]
            _spawn(sock, (wakeup_r, wakeup_w), mine, request)


def _spawn(sock: socket.socket, wakeup: tuple[int, int], fds: list[int], request: dict[str, Any]) -> None:
    if len(fds) != 3 or request.get("op") != "spawn":
        for fd in fds:
            os.close(fd)
        frames.write_frame(sock, {"op": "error", "id": request.get("id"), "message": "bad spawn request"})
        return
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            code = _child(sock, wakeup, fds, request["job"])
        finally:
            os._exit(code)  # never return into the zygote's loop, whatever happened
    for fd in fds:
        os.close(fd)
    frames.write_frame(sock, {"op": "spawned", "id": request.get("id"), "pid": pid})


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        frames.write_frame(sock, {"op": "exited", "pid": pid, "status": code})


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[1]))
    sock.setblocking(True)
    preload()
    try:
        return serve(sock)
    except (frames.FrameError, OSError):
        return 1


# ---------------------------------------------------------------- the agent's side
class Zygote:
    """The agent's side of the zygote: start it once, ask it to fork workers, learn how they exited."""

    def __init__(self, *, threads: int = 1) -> None:
        self._threads = threads
        self._proc: asyncio.subprocess.Process | None = None
        self._sock: socket.socket | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._next_id = 0
        self._spawned: dict[int, asyncio.Future[int]] = {}
        self._exits: dict[int, asyncio.Future[int]] = {}

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def _ensure(self) -> socket.socket:
        if self._sock is not None and self._proc is not None and self._proc.returncode is None:
            return self._sock
        await self.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tether.agent.zygote",
                str(theirs.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                env=runtime.worker_env(self._threads),
                start_new_session=True,
            )
        finally:
            theirs.close()
        reader, self._writer = await asyncio.open_unix_connection(sock=ours)  # the writer owns the socket
        self._sock = ours
        self._reader_task = asyncio.create_task(self._read(reader), name="zygote-reader")
        return ours

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                doc = await frames.read_frame_async(reader)
                if doc.get("op") == "exited" and isinstance(doc.get("pid"), int):
                    self._exit_future(doc["pid"]).set_result(int(doc.get("status", -1)))
                elif (fut := self._spawned.pop(doc.get("id", -1), None)) is not None and not fut.done():
                    if doc.get("op") == "spawned" and isinstance(doc.get("pid"), int):
                        fut.set_result(doc["pid"])
                    else:
                        fut.set_exception(errors.TaskFailed(f"zygote could not start a worker: {doc.get('message')}"))
        except (frames.FrameError, OSError):
            pass
        finally:
            for fut in self._spawned.values():
                if not fut.done():
                    fut.set_exception(errors.TaskFailed("the zygote exited"))
            self._spawned.clear()

    def _exit_future(self, pid: int) -> asyncio.Future[int]:
        fut = self._exits.get(pid)
        if fut is None:
            if len(self._exits) >= 4096:  # exits nobody asked about (workers the pool retired): keep the newest
                for old in [p for p, f in self._exits.items() if f.done()][:2048]:
                    del self._exits[old]
            fut = self._exits[pid] = asyncio.get_running_loop().create_future()
        return fut

    async def spawn(self, job: Mapping[str, Any], fds: list[int]) -> int:
        """Fork a worker for `job` with (channel, buffer, log); its pid."""
        async with self._lock:
            sock = await self._ensure()
            self._next_id += 1
            fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._spawned[self._next_id] = fut
            data = frames.encode({"op": "spawn", "id": self._next_id, "job": dict(job)})
            socket.send_fds(sock, [data], fds)  # a small message on a local socket: it does not block
        return await fut

    async def exit_status(self, pid: int, *, timeout: float = EXIT_STATUS_WAIT_S) -> int | None:
        fut = self._exit_future(pid)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            return None
        finally:
            if fut.done():
                self._exits.pop(pid, None)

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reader_task
        if self._writer is not None:
            self._writer.close()
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            with contextlib.suppress(Exception):
                await self._proc.wait()
        self._proc, self._sock, self._writer, self._reader_task = None, None, None, None


if __name__ == "__main__":
    sys.exit(main(sys.argv))
