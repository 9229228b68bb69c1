"""Running entrypoints in an isolated worker: results, failures, timeouts, memory limits, state."""

from __future__ import annotations

import os
import pathlib
import time

import numpy as np
import pytest
from agent_fakes import write_bundle

from tether.agent import results, runtime
from tether.common import bundle_files, errors
from tether.proto.v1 import tether_pb2 as pb

OK_TASK = """
import os
import numpy as np

def run(ctx):
    ctx.state["n"] = ctx.state.get("n", 0) + 1
    ctx.log(f"pid {os.getpid()} run {ctx.state['n']}")
    assert ctx.model is None
    return {"sample_count": 3, "metrics": {"loss": 0.5}, "tensors": {"v": np.arange(6).reshape(2, 3)},
            "counts": {"rows": np.int64(3)}}
"""


async def run(tmp_path: pathlib.Path, source: str, *, state=None, limits=runtime.TaskLimits(timeout_s=30)):
    bundle = write_bundle(tmp_path / "bundle", source)
    (tmp_path / "data").mkdir(exist_ok=True)
    return await runtime.run_task(
        bundle_dir=bundle,
        bundle=bundle_files.build_manifest(bundle),
        data_dir=tmp_path / "data",
        state=state,
        limits=limits,
        work_dir=tmp_path,
    )


async def test_result_state_and_logs(tmp_path) -> None:
    out = await run(tmp_path, OK_TASK, state={"n": 41})
    assert out.result.sample_count == 3
    assert out.result.metrics == {"loss": 0.5}
    assert out.result.counts == {"rows": 3}
    np.testing.assert_array_equal(out.result.tensors["v"], np.arange(6.0).reshape(2, 3))
    assert out.result.tensors["v"].dtype == np.float64
    assert out.state == {"n": 42}
    assert len(out.logs) == 1 and out.logs[0].endswith("run 42")
    assert int(out.logs[0].split()[1]) != os.getpid()  # ran in another process
    assert out.duration_s > 0
    assert not list(tmp_path.glob("tether-job-*"))  # job directory cleaned up


async def test_task_that_raises_reports_type_message_and_traceback(tmp_path) -> None:
    src = "def helper():\n    raise KeyError('no such column: price')\n\ndef run(ctx):\n    helper()\n"
    with pytest.raises(errors.TaskFailed) as e:
        await run(tmp_path, src)
    text = str(e.value)
    assert text.startswith("KeyError: 'no such column: price'")
    assert "Traceback" in text and "in helper" in text


async def test_task_that_hangs_is_killed_at_timeout(tmp_path) -> None:
    marker = tmp_path / "child.pid"
    src = (
        f"import os, time\n\ndef run(ctx):\n"
        f"    open({str(marker)!r}, 'w').write(str(os.getpid()))\n    time.sleep(600)\n"
    )
    started = time.monotonic()
    with pytest.raises(errors.TaskFailed, match=r"timed out after 1\.5s"):
        await run(tmp_path, src, limits=runtime.TaskLimits(timeout_s=1.5))
    assert time.monotonic() - started < 10
    pid = int(marker.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_memory_limit(tmp_path) -> None:
    src = (
        "import numpy as np\n\ndef run(ctx):\n"
        "    big = np.ones(400 * 1024 * 1024 // 8)\n    return {'sample_count': int(big.sum())}\n"
    )
    with pytest.raises(errors.TaskFailed, match="MemoryError"):
        await run(tmp_path, src, limits=runtime.TaskLimits(timeout_s=30, memory_mb=256))
    # The same task fits a larger limit.
    out = await run(tmp_path, src, limits=runtime.TaskLimits(timeout_s=30, memory_mb=1024))
    assert out.result.sample_count == 400 * 1024 * 1024 // 8


async def test_worker_crash_is_a_task_failure(tmp_path) -> None:
    with pytest.raises(errors.TaskFailed, match="SIGKILL"):
        await run(tmp_path, "import os, signal\n\ndef run(ctx):\n    os.kill(os.getpid(), signal.SIGKILL)\n")


@pytest.mark.parametrize(
    ("ret", "match"),
    [
        ("None", "must return a dict"),
        ("{'metrics': {}}", "sample_count is required"),
        ("{'sample_count': 1, 'metrics': {'acc': float('nan')}}", "not finite"),
        ("{'sample_count': 1, 'tensors': {'t': np.array([1.0, np.inf])}}", "NaN or infinite"),
        ("{'sample_count': 1, 'tensors': {'t': np.array(['a'])}}", "not numeric"),
        ("{'sample_count': -1}", "outside"),
        ("{'sample_count': 1, 'counts': {'bad name': 1}}", "must match"),
        ("{'sample_count': 1, 'extra': 1}", "unknown keys"),
    ],
)
async def test_invalid_results_are_task_failures(tmp_path, ret: str, match: str) -> None:
    with pytest.raises(errors.TaskFailed, match=match):
        await run(tmp_path, f"import numpy as np\n\ndef run(ctx):\n    return {ret}\n")


async def test_state_must_stay_json(tmp_path) -> None:
    src = "def run(ctx):\n    ctx.state['f'] = object()\n    return {'sample_count': 0}\n"
    with pytest.raises(errors.TaskFailed, match="TypeError"):
        await run(tmp_path, src)


def test_validate_bounds() -> None:
    with pytest.raises(errors.TaskFailed, match="elements"):
        results.validate({"sample_count": 1, "tensors": {"t": np.zeros(results.MAX_TENSOR_ELEMENTS + 1)}})
    with pytest.raises(errors.TaskFailed, match="entries"):
        results.validate({"sample_count": 1, "metrics": {f"m{i}": 1.0 for i in range(results.MAX_METRICS + 1)}})
    with pytest.raises(errors.TaskFailed, match="integer"):
        results.validate({"sample_count": True})


def test_upload_request_encodes_float64_little_endian() -> None:
    r = results.validate(
        {"sample_count": 2, "metrics": {"a": 1}, "tensors": {"t": np.array([[1, 2], [3, 4]], np.float32)}, "counts": {}}
    )
    req = results.to_upload_request(r, release="ns/x", version=3, idempotency_key="k", duration_s=0.25)
    assert isinstance(req, pb.UploadResultRequest)
    assert (req.release, req.version, req.idempotency_key, req.sample_count) == ("ns/x", 3, "k", 2)
    (t,) = req.tensors
    assert list(t.shape) == [2, 2] and t.data == np.array([1, 2, 3, 4], "<f8").tobytes()
    np.testing.assert_array_equal(results.tensor_from_proto(t), [[1, 2], [3, 4]])
    assert pb.UploadResultRequest.FromString(req.SerializeToString()) == req


def test_limits_from_spec() -> None:
    limits = runtime.TaskLimits.from_json({"timeoutSeconds": 5, "memoryMB": 300})
    assert limits == runtime.TaskLimits(timeout_s=5.0, memory_mb=300)
    assert runtime.TaskLimits.from_json(None) == runtime.TaskLimits()
    with pytest.raises(errors.InvalidArgument):
        runtime.TaskLimits(timeout_s=0)
    with pytest.raises(errors.InvalidArgument):
        runtime.TaskLimits(cpu_seconds=0)
    # The caps (the agent's own limits) bound each limit and stand in for the ones left out.
    caps = runtime.TaskLimits(timeout_s=10, memory_mb=256, cpu_seconds=20)
    both = runtime.TaskLimits.from_json({"timeoutSeconds": 600, "memoryMB": 64, "cpuSeconds": 5}, caps=caps)
    assert both == runtime.TaskLimits(timeout_s=10, memory_mb=64, cpu_seconds=5)
    assert runtime.TaskLimits.from_json({}, caps=caps) == caps
    assert runtime.TaskLimits.from_wire("", caps=caps) == caps
    assert runtime.TaskLimits.from_wire('{"memoryMB": 16}', caps=caps).memory_mb == 16


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("{", "resources"),
        ("[1]", "resources"),
        ("null", "resources"),
        ('{"timeoutSeconds": 0}', "resources.timeoutSeconds"),
        ('{"timeoutSeconds": 2.5}', "resources.timeoutSeconds"),
        ('{"memoryMB": 15}', "resources.memoryMB"),
        ('{"memoryMB": true}', "resources.memoryMB"),
        ('{"cpuSeconds": null}', "resources.cpuSeconds"),
        ('{"cpuSeconds": 86401}', "resources.cpuSeconds"),
        ('{"diskMB": 10}', "resources.diskMB"),
    ],
)
def test_malformed_resources_name_the_field(text: str, field: str) -> None:
    with pytest.raises(errors.InvalidSpec) as info:
        runtime.TaskLimits.from_wire(text)
    assert info.value.field == field


async def test_cpu_time_limit(tmp_path) -> None:
    spin = "def run(ctx):\n    while True:\n        pass\n"
    started = time.monotonic()
    with pytest.raises(errors.TaskFailed, match=r"CPU-time limit of 1s"):
        await run(tmp_path, spin, limits=runtime.TaskLimits(timeout_s=30, cpu_seconds=1))
    assert time.monotonic() - started < 10
    # Sleeping costs no CPU time: only the wall-clock timeout applies to it.
    nap = "import time\n\ndef run(ctx):\n    time.sleep(1.5)\n    return {'sample_count': 1}\n"
    out = await run(tmp_path, nap, limits=runtime.TaskLimits(timeout_s=30, cpu_seconds=1))
    assert out.result.sample_count == 1
