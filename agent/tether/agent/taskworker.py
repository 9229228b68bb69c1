"""The task worker: `python -m tether.agent.taskworker <job dir>` (started by `runtime.run_task`).

Applies its own memory and CPU-time limits first, then loads the bundle's model(s), imports
the entrypoint, calls `run(ctx)` and writes the answer files described in
`tether.agent.runtime`. Exit status 0 means result.json was written; 1 means
error.json was (the task raised, or its result was invalid).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import resource
import sys
import traceback
from typing import Any


def limit_memory(memory_mb: int) -> None:
    limit = int(memory_mb) * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _limit_cpu(cpu_seconds: int | None) -> None:
    """RLIMIT_CPU: SIGXCPU (fatal: not handled) at `cpu_seconds` of CPU time, SIGKILL a second later."""
    if cpu_seconds is None:
        return
    soft = int(cpu_seconds)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
        new_hard = min(soft + 1, hard)
    else:
        new_hard = soft + 1
    resource.setrlimit(resource.RLIMIT_CPU, (soft, new_hard))


def _write_json(path: pathlib.Path, doc: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, allow_nan=False))
    os.replace(tmp, path)


class _Log:
    def __init__(self, path: pathlib.Path, *, max_bytes: int = 64 * 1024) -> None:
        self._f = path.open("a", encoding="utf-8")
        self._left = max_bytes

    def __call__(self, msg: str) -> None:
        line = str(msg).replace("\n", " ")[:2000] + "\n"
        if len(line) <= self._left:
            self._left -= len(line)
            self._f.write(line)
            self._f.flush()


def load_entrypoint(bundle_dir: pathlib.Path, entrypoint: str) -> Any:
    path = (bundle_dir / entrypoint).resolve()
    if not path.is_relative_to(bundle_dir):
        raise ImportError(f"entrypoint {entrypoint!r} is outside the bundle")
    sys.path.insert(0, str(path.parent))  # a bundle may import its own modules
    spec = importlib.util.spec_from_file_location("tether_task_entrypoint", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load entrypoint {entrypoint!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    run = getattr(module, "run", None)
    if not callable(run):
        raise AttributeError(f"entrypoint {entrypoint!r} defines no run(ctx)")
    return run


def load_models(job: dict[str, Any]) -> dict[str, Any]:
    """The bundle's models by path, each on the backend selection chose (or the job's backend)."""
    from tether.agent import engine

    bundle_dir = pathlib.Path(job["bundle_dir"])
    models: dict[str, Any] = {}
    chosen = job.get("selection") or {}
    for need in job.get("engines") or []:
        if need["model"] in chosen:  # backend selection's choice: maybe the other format of the model
            from tether.agent import backends

            model = backends.load_selected(bundle_dir, chosen[need["model"]])
        else:
            model = engine.get_engine(need["engine"]).load(
                str(bundle_dir / need["model"]), backend=job.get("backend", "cpu"), threads=job.get("threads", 1)
            )
        shapes = {k: tuple(v) for k, v in (need.get("inputs") or {}).items()}
        if shapes and hasattr(model, "resize"):
            model.resize(shapes)
        models[need["model"]] = model
    return models


def _execute(job_dir: pathlib.Path, job: dict[str, Any]) -> None:
    import numpy as np

    from tether.agent import results
    from tether.agent.runtime import TaskContext
    from tether.agent.tunnel import emitter

    bundle_dir = pathlib.Path(job["bundle_dir"])
    models = load_models(job)
    first = next(iter(models.values()), None)
    ctx = TaskContext(
        model=first,
        data_dir=job["data_dir"],
        state=dict(job.get("state") or {}),
        bundle_dir=str(bundle_dir),
        log=_Log(job_dir / "task.log"),
        models=models,
        inputs=dict(job.get("inputs") or {}),
        emit=emitter.from_grant(job.get("emit")),
    )
    run = load_entrypoint(bundle_dir, job["entrypoint"])
    result = results.validate(run(ctx))
    if not isinstance(ctx.state, dict):
        raise TypeError("ctx.state must stay a dict")
    state = json.loads(json.dumps(ctx.state, allow_nan=False))  # must be JSON-able
    if result.tensors:
        np.savez(job_dir / "tensors.npz", **result.tensors)  # type: ignore[arg-type]  # numpy types **kwds by allow_pickle
    _write_json(
        job_dir / "result.json",
        {
            "sample_count": result.sample_count,
            "metrics": dict(result.metrics),
            "counts": dict(result.counts),
            "tensors": list(result.tensors),
            "state": state,
            "backend": getattr(first, "backend", ""),
        },
    )


def main(argv: list[str]) -> int:
    job_dir = pathlib.Path(argv[1])
    job = json.loads((job_dir / "job.json").read_text())
    try:
        limit_memory(job["memory_mb"])
        _limit_cpu(job.get("cpu_seconds"))
        _execute(job_dir, job)
    except BaseException as e:  # report everything, SystemExit and KeyboardInterrupt included
        try:
            _write_json(
                job_dir / "error.json",
                {"type": type(e).__name__, "message": str(e)[:4000], "traceback": traceback.format_exc()[-8000:]},
            )
        except BaseException:
            os._exit(3)
        return 1
    return 0


if __name__ == "__main__":
    code = main(sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: native engine thread pools sometimes crash or hang in it,
    # which would turn a finished run into a failure.
    os._exit(code)
