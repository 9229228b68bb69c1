"""Task isolation: several runs at once, a hung or crashing task never affects the others,
what a task leaves behind dies with it, bad models and inputs fail clearly, ctx.inputs arrives."""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import time

import pytest
from agent_fakes import write_bundle

from tether.agent import runtime
from tether.common import bundle_files, errors


async def run(tmp_path: pathlib.Path, source: str, *, name: str = "b", inputs=None, limits=None, extra=None, spec=None):
    bundle = write_bundle(tmp_path / name, source, extra=extra)
    if spec is not None:
        (bundle / "bundle.yaml").write_text(spec)
    (tmp_path / "data").mkdir(exist_ok=True)
    return await runtime.run_task(
        bundle_dir=bundle,
        bundle=bundle_files.build_manifest(bundle),
        data_dir=tmp_path / "data",
        limits=limits or runtime.TaskLimits(timeout_s=30),
        work_dir=tmp_path,
        inputs=inputs,
    )


SLEEP_1S = "import time\n\ndef run(ctx):\n    time.sleep(1.0)\n    return {'sample_count': 1}\n"


async def test_several_tasks_run_at_once(tmp_path) -> None:
    started = time.monotonic()
    outcomes = await asyncio.gather(*(run(tmp_path, SLEEP_1S, name=f"b{i}") for i in range(4)))
    elapsed = time.monotonic() - started
    assert [o.result.sample_count for o in outcomes] == [1, 1, 1, 1]
    assert elapsed < 3.5, elapsed  # four 1 s tasks in parallel, not 4 s in a row (worker start-up included)


async def test_a_hung_and_a_crashing_task_do_not_affect_a_healthy_one(tmp_path) -> None:
    hang = "def run(ctx):\n    while True:\n        pass\n"
    crash = "import ctypes\n\ndef run(ctx):\n    ctypes.string_at(0)\n"  # SIGSEGV in the worker
    ok = "def run(ctx):\n    return {'sample_count': 7}\n"
    results = await asyncio.gather(
        run(tmp_path, hang, name="hang", limits=runtime.TaskLimits(timeout_s=2)),
        run(tmp_path, crash, name="crash"),
        run(tmp_path, ok, name="ok"),
        return_exceptions=True,
    )
    assert isinstance(results[0], errors.TaskFailed) and "timed out after 2s" in str(results[0])
    assert isinstance(results[1], errors.TaskFailed) and "SIGSEGV" in str(results[1])
    assert results[2].result.sample_count == 7
    assert not list(tmp_path.glob("tether-job-*"))  # job directories are removed whatever happened


async def test_processes_a_task_starts_die_with_it(tmp_path) -> None:
    pidfile = tmp_path / "child.pid"
    source = (
        "import subprocess, sys\n\ndef run(ctx):\n"
        "    p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"    open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "    return {'sample_count': 1}\n"
    )
    await run(tmp_path, source)
    pid = int(pidfile.read_text())
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        await asyncio.sleep(0.02)
    else:
        with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its (dead) parent's reaper is dead too
            assert f.read().split()[2] == "Z"


async def test_inputs_reach_the_task_and_must_be_json(tmp_path) -> None:
    source = (
        "def run(ctx):\n"
        "    ev = ctx.inputs['events']\n"
        "    return {'sample_count': len(ev), 'counts': {'trigger_' + ctx.inputs['trigger']['type']: 1}}\n"
    )
    inputs = {"trigger": {"type": "pattern"}, "events": [{"type": "a"}, {"type": "b"}]}
    out = await run(tmp_path, source, inputs=inputs)
    assert out.result.sample_count == 2 and out.result.counts == {"trigger_pattern": 1}
    with pytest.raises(errors.TaskFailed, match="not JSON-able"):
        await run(tmp_path, source, name="b2", inputs={"x": object()})
    with pytest.raises(errors.TaskFailed, match="not JSON-able"):
        await run(tmp_path, source, name="b3", inputs={"x": float("nan")})


async def test_old_tasks_without_inputs_still_run(tmp_path, digits_dir, data_dir) -> None:
    bundle = tmp_path / "digits"
    shutil.copytree(digits_dir, bundle)
    out = await runtime.run_task(
        bundle_dir=bundle, bundle=bundle_files.build_manifest(bundle), data_dir=data_dir, work_dir=tmp_path
    )
    assert out.result.sample_count == 150


async def test_a_model_that_fails_to_load_is_a_clear_failure(tmp_path) -> None:
    spec = "name: t\nentrypoint: task.py\nengines:\n- engine: mnn\n  model: model.mnn\n"
    with pytest.raises(errors.TaskFailed) as info:
        await run(
            tmp_path,
            "def run(ctx):\n    return {'sample_count': 1}\n",
            extra={"model.mnn": b"\x00not a model" * 64},
            spec=spec,
        )
    message = str(info.value)
    assert "model.mnn" in message.splitlines()[0], message  # names the model, not just what the engine said


async def test_a_shape_mismatch_is_a_clear_failure(tmp_path, digits_dir) -> None:
    bundle = tmp_path / "digits"
    shutil.copytree(digits_dir, bundle)
    (bundle / "task.py").write_text(
        "import numpy as np\n\ndef run(ctx):\n"
        "    ctx.model.run({'input': np.zeros((2, 63), np.float32)})\n"
        "    return {'sample_count': 1}\n"
    )
    with pytest.raises(errors.TaskFailed) as info:
        await runtime.run_task(
            bundle_dir=bundle,
            bundle=bundle_files.build_manifest(bundle),
            data_dir=tmp_path,
            work_dir=tmp_path,
            limits=runtime.TaskLimits(timeout_s=30),
        )
    first = str(info.value).splitlines()[0]
    assert "input" in first and "63" in first, first


async def test_a_task_exhausting_memory_leaves_the_next_run_unaffected(tmp_path) -> None:
    hog = "import numpy as np\n\ndef run(ctx):\n    x = np.ones(2 * 1024**3 // 8)\n    return {'sample_count': 1}\n"
    with pytest.raises(errors.TaskFailed, match="MemoryError"):
        await run(tmp_path, hog, limits=runtime.TaskLimits(timeout_s=30, memory_mb=256))
    ok = "import numpy as np\n\ndef run(ctx):\n    return {'sample_count': int(np.ones(10).sum())}\n"
    assert (await run(tmp_path, ok, name="b2")).result.sample_count == 10
