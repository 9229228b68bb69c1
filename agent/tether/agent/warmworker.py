"""A warm task worker: one release version's bundle imported and its models loaded, serving runs.

Forked from the zygote (`tether.agent.zygote`), which has already put it in a
session of its own, closed every descriptor but its channel (fd 3), its
result buffer (fd 4) and its log (stdout/stderr), and applied the task's
address-space limit, all before this module runs any task code. `serve`
then loads the models on the backend the agent chose, imports the
entrypoint and says `ready`; afterwards each `run` frame gets one `result` or
`error` frame (`tether.agent.frames`):

    -> {"op": "run", "id", "state", "inputs"}
    <- {"op": "result", "id", "sample_count", "metrics", "counts", "tensors": [layout], "state", "backend", "logs"}
    <- {"op": "error", "id", "type", "message", "traceback", "fatal"}

Result tensors (float64 after `results.validate`) are written into the
shared-memory buffer the agent created (`multiprocessing.shared_memory`,
handed over as a descriptor); the frame carries each one's offset and shape.
The agent re-validates all of it: this process runs untrusted code.

`fatal` means the worker may be damaged (MemoryError: the address-space
limit was hit); the agent then replaces it. ctx.state starts each run from
what the agent sends, so it is written back only when a run succeeds, as
with a fresh worker.
"""

from __future__ import annotations

import json
import mmap
import os
import pathlib
import socket
import traceback
from typing import Any

from tether.agent import frames

CHANNEL_FD = 3
BUFFER_FD = 4
ALIGN = 64
MAX_LOG_BYTES = 64 * 1024


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self._left = MAX_LOG_BYTES

    def __call__(self, msg: str) -> None:
        line = str(msg).replace("\n", " ")[:2000]
        if len(line) + 1 <= self._left:
            self._left -= len(line) + 1
            self.lines.append(line)


def _error(e: BaseException, **extra: Any) -> dict[str, Any]:
    return {
        "op": "error",
        "type": type(e).__name__,
        "message": str(e)[:4000],
        "traceback": traceback.format_exc()[-8000:],
        "fatal": isinstance(e, MemoryError),
        **extra,
    }


def _write_tensors(buf: mmap.mmap, tensors: dict[str, Any]) -> list[dict[str, Any]]:
    import numpy as np

    layout, offset = [], 0
    for name, value in tensors.items():
        arr = np.ascontiguousarray(value, dtype="<f8")
        if offset + arr.nbytes > len(buf):
            raise ValueError(f"result tensors are larger than the {len(buf)}-byte result buffer")
        np.frombuffer(buf, dtype="<f8", count=arr.size, offset=offset).reshape(arr.shape)[...] = arr
        layout.append({"name": name, "dtype": "<f8", "shape": list(arr.shape), "offset": offset})
        offset += -(-arr.nbytes // ALIGN) * ALIGN
    return layout


_EMITTERS: dict[str, Any] = {}  # ctx.emit by grant token: one connection to the agent's tunnel per worker


def _emitter(grant: dict[str, Any] | None) -> Any:
    from tether.agent.tunnel import emitter

    if not grant:
        return emitter.unavailable
    token = str(grant.get("token"))
    if token not in _EMITTERS:
        _EMITTERS[token] = emitter.from_grant(grant)
    return _EMITTERS[token]


def serve(job: dict[str, Any]) -> int:
    """The worker's life: load, say ready, answer runs until the channel closes. Returns an exit status."""
    from tether.agent import results, taskworker
    from tether.agent.runtime import TaskContext

    channel = socket.socket(fileno=CHANNEL_FD)
    buf = mmap.mmap(BUFFER_FD, int(job["buffer_bytes"]))
    bundle_dir = pathlib.Path(job["bundle_dir"])
    try:
        models = taskworker.load_models(job)
        run = taskworker.load_entrypoint(bundle_dir, job["entrypoint"])
    except BaseException as e:  # a model that does not load, an entrypoint that does not import
        frames.write_frame(channel, _error(e, fatal=True))
        return 1
    first = next(iter(models.values()), None)
    backend = str(getattr(first, "backend", ""))
    frames.write_frame(channel, {"op": "ready", "backend": backend, "pid": os.getpid()})
    while True:
        try:
            request = frames.read_frame(channel)
        except frames.FrameError:
            return 0  # the agent closed the channel: retire
        if request.get("op") != "run":
            return 2
        run_id = request.get("id")
        log = _Log()
        try:
            ctx = TaskContext(
                model=first,
                data_dir=job["data_dir"],
                state=dict(request.get("state") or {}),
                bundle_dir=str(bundle_dir),
                log=log,
                models=models,
                inputs=dict(request.get("inputs") or {}),
                emit=_emitter(request.get("emit")),
            )
            result = results.validate(run(ctx))
            if not isinstance(ctx.state, dict):
                raise TypeError("ctx.state must stay a dict")
            state = json.loads(json.dumps(ctx.state, allow_nan=False))  # must be JSON-able
            answer = {
                "op": "result",
                "id": run_id,
                "sample_count": result.sample_count,
                "metrics": dict(result.metrics),
                "counts": dict(result.counts),
                "tensors": _write_tensors(buf, dict(result.tensors)),
                "state": state,
                "backend": backend,
                "logs": log.lines,
            }
        except BaseException as e:  # report everything, SystemExit and KeyboardInterrupt included
            answer = _error(e, id=run_id, logs=log.lines)
        try:
            try:
                frames.write_frame(channel, answer)
            except frames.FrameError as e:  # e.g. a state too large to send: say so, the frame itself is small
                frames.write_frame(channel, {**_error(e), "id": run_id})
        except OSError:  # the task closed or broke the channel: nothing more can be said
            return 3
