"""Warm task workers: resident between runs, forked from the zygote, isolated, and replaced alone when bad.

Each bad-input case (a crash, a hang, a busy loop past its CPU time, a memory
blow-up, a fork, a closed or garbled channel) runs beside a healthy task in
the same pool: the bad one's worker is killed with a clear reason, the run
fails with it, and the healthy task keeps its worker.
"""

from __future__ import annotations

import asyncio
import os
import pathlib

import pytest
from agent_fakes import wait_until, write_bundle

from tether.agent import runtime, warmpool
from tether.common import bundle_files, errors

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc (Linux)")

OK = (
    "import numpy as np\n\n"
    "def run(ctx):\n"
    "    ctx.state['n'] = ctx.state.get('n', 0) + 1\n"
    "    ctx.log(f\"run {ctx.state['n']}\")\n"
    "    return {'sample_count': ctx.state['n'], 'metrics': {'pid': float(__import__('os').getpid())},\n"
    "            'tensors': {'t': np.arange(6.0).reshape(2, 3) * ctx.state['n']}}\n"
)


@pytest.fixture()
async def pool(tmp_path: pathlib.Path):
    (tmp_path / "data").mkdir()
    p = warmpool.WorkerPool(work_dir=tmp_path)
    yield p
    await p.close()


async def run(pool, tmp_path, source, *, name="ok", version=1, state=None, limits=None, inputs=None):
    bundle = tmp_path / name / str(version)
    if not bundle.exists():
        write_bundle(bundle, source)
    return await pool.run(
        release=f"default/{name}",
        version=version,
        bundle_dir=bundle,
        bundle=bundle_files.build_manifest(bundle),
        data_dir=tmp_path / "data",
        state=state,
        limits=limits or runtime.TaskLimits(timeout_s=30),
        inputs=inputs,
    )


def _alive(pid: int) -> bool:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def pid_of(outcome) -> int:
    return int(outcome.result.metrics["pid"])


async def test_a_warm_worker_serves_every_run_and_state_follows_the_agent(pool, tmp_path) -> None:
    first = await run(pool, tmp_path, OK)
    second = await run(pool, tmp_path, OK, state=first.state)
    assert (first.result.sample_count, second.result.sample_count) == (1, 2)
    assert pid_of(first) == pid_of(second)  # the same resident worker
    assert second.result.tensors["t"].tolist() == [[0, 2, 4], [6, 8, 10]]  # through shared memory
    assert second.logs == ("run 2",)
    # ctx.state is what the agent hands over: a run from the stored state again counts from it
    again = await run(pool, tmp_path, OK, state=first.state)
    assert again.result.sample_count == 2


async def test_the_worker_is_isolated_and_limited(pool, tmp_path) -> None:
    outcome = await run(pool, tmp_path, OK, limits=runtime.TaskLimits(timeout_s=30, memory_mb=700))
    pid = pid_of(outcome)
    assert os.getsid(pid) == pid  # a session (and process group) of its own
    limits = pathlib.Path(f"/proc/{pid}/limits").read_text()
    assert str(700 * 1024 * 1024) in next(line for line in limits.splitlines() if "address space" in line)
    fds = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    home = pathlib.Path(os.readlink(f"/proc/{pid}/cwd"))  # its own directory, as a fresh worker's job directory
    assert home.parent == tmp_path and home.name.startswith("tether-worker-") and os.listdir(home) == ["output.log"]
    kinds = sorted("shm" if t.startswith("/dev/shm/") else t.split(":")[0] if ":" in t else t for t in fds)
    # stdin, the log (stdout, stderr), its channel, its result buffer (mapped): nothing of the agent's or the zygote's
    assert kinds == sorted(["/dev/null", str(home / "output.log"), "socket", "shm"]), fds
    assert pool.zygote.pid is not None
    status = pathlib.Path(f"/proc/{pool.zygote.pid}/status").read_text()
    assert "Threads:\t1\n" in status  # forking is safe only from a single-threaded parent


async def test_a_raising_task_keeps_its_worker_and_its_state_is_not_written(pool, tmp_path) -> None:
    raising = "import os\n_n = [0]\n\ndef run(ctx):\n    _n[0] += 1\n    ctx.state['x'] = 1\n"
    raising += "    if _n[0] == 1:\n        raise RuntimeError('first run fails')\n"
    raising += "    return {'sample_count': 1, 'metrics': {'pid': float(os.getpid())}}\n"
    with pytest.raises(errors.TaskFailed, match="RuntimeError: first run fails"):
        await run(pool, tmp_path, raising, name="raising")
    ok = await run(pool, tmp_path, raising, name="raising", state={"y": 2})
    assert ok.state == {"y": 2, "x": 1}
    assert len(pool.workers()) == 1
    assert pool.workers()[0].pid == pid_of(ok)  # module globals survived the failed run: the same worker


BAD = {
    "crash": ("import ctypes\n\ndef run(ctx):\n    ctypes.string_at(0)\n", "SIGSEGV"),
    "hang": ("def run(ctx):\n    while True:\n        pass\n", "timed out after 3s"),
    "cpu": ("def run(ctx):\n    while True:\n        pass\n", "CPU-time limit of 1s"),
    "leak": (
        "_keep = []\n\ndef run(ctx):\n    while True:\n        _keep.append(bytearray(32 << 20))\n",
        "MemoryError",
    ),
    "forks": (
        "import os, time\n\ndef run(ctx):\n    child = os.fork()\n    if child == 0:\n        time.sleep(60)\n"
        "        os._exit(0)\n    open(f'{ctx.data_dir}/child.pid', 'w').write(str(child))\n"
        "    return {'sample_count': 1}\n",
        "may not fork",
    ),
    "closes": ("import os\n\ndef run(ctx):\n    os.close(3)\n    return {'sample_count': 1}\n", "channel closed"),
    "garbage": (
        "import os\n\ndef run(ctx):\n    os.write(3, b'\\x00\\x00\\x00\\x05hello')\n    return {'sample_count': 1}\n",
        "broke the protocol|not JSON",
    ),
    "huge": (
        "import os\n\ndef run(ctx):\n    os.write(3, b'\\xff\\xff\\xff\\xff')\n    return {'sample_count': 1}\n",
        "over the limit",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
async def test_a_bad_task_loses_its_worker_and_no_one_else_does(pool, tmp_path, case) -> None:
    source, reason = BAD[case]
    healthy = await run(pool, tmp_path, OK)
    limits = runtime.TaskLimits(
        timeout_s=3 if case == "hang" else 60,
        memory_mb=300 if case == "leak" else 512,
        cpu_seconds=1 if case == "cpu" else None,
    )
    bad, again = await asyncio.gather(
        run(pool, tmp_path, source, name=case, limits=limits),
        run(pool, tmp_path, OK, state=healthy.state),
        return_exceptions=True,
    )
    assert isinstance(bad, errors.TaskFailed), bad
    assert __import__("re").search(reason, str(bad)), str(bad)
    assert pid_of(again) == pid_of(healthy) and again.result.sample_count == 2
    assert [w.key[0].split("@")[0] for w in pool.workers()] == ["default/ok"]  # only the bad one went
    if case == "forks":  # the forked child was in the worker's process group: it died with it
        child = int((tmp_path / "data" / "child.pid").read_text())
        await wait_until(lambda: not _alive(child))
    # the next run of the bad task gets a new worker (after a backoff)
    if case in ("crash", "closes"):
        with pytest.raises(errors.TaskFailed):
            await run(pool, tmp_path, source, name=case, limits=limits)


async def test_a_model_or_entrypoint_that_does_not_load_fails_the_run(pool, tmp_path) -> None:
    with pytest.raises(errors.TaskFailed, match="ZeroDivisionError"):
        await run(pool, tmp_path, "1 / 0\n", name="broken")
    assert pool.workers() == []


async def test_an_upgrade_drains_the_old_version(pool, tmp_path) -> None:
    v1 = await run(pool, tmp_path, OK, version=1)
    v2 = await run(pool, tmp_path, OK, version=2)
    assert pid_of(v1) != pid_of(v2)
    assert [w.key[1] for w in pool.workers()] == [2]


async def test_a_new_version_is_started_ahead_of_its_first_run(pool, tmp_path) -> None:
    v1 = await run(pool, tmp_path, OK, version=1)
    bundle = write_bundle(tmp_path / "ok" / "2", OK)
    ahead = dict(release="default/ok", version=2, bundle_dir=bundle, data_dir=tmp_path / "data")
    assert pool.prewarm(bundle=bundle_files.build_manifest(bundle), **ahead)
    assert not pool.prewarm(bundle=bundle_files.build_manifest(bundle), **ahead)  # one start at a time
    assert [w.key[1] for w in pool.workers()] == []  # v1's idle worker drained at once
    await wait_until(lambda: [w.key[1] for w in pool.workers()] == [2])
    started = pool.workers()[0].pid
    v2 = await run(pool, tmp_path, OK, version=2)
    assert pid_of(v2) == started != pid_of(v1) and pool.cold_runs == 0


async def test_idle_workers_retire(pool, tmp_path) -> None:
    await run(pool, tmp_path, OK)
    assert pool.retire_idle() == 0
    assert pool.retire_idle(now=asyncio.get_running_loop().time() + 10**6) == 1
    assert pool.workers() == []
    assert not list(tmp_path.glob("tether-worker-*"))  # its directory (cwd, log) went with it


async def test_caps_on_workers_and_memory(tmp_path) -> None:
    (tmp_path / "data").mkdir()
    cold = warmpool.WorkerPool(work_dir=tmp_path, settings=warmpool.PoolSettings(max_workers=0))
    tight = warmpool.WorkerPool(work_dir=tmp_path, settings=warmpool.PoolSettings(memory_budget=1))
    one = warmpool.WorkerPool(work_dir=tmp_path, settings=warmpool.PoolSettings(max_workers=1))
    try:
        a, b = await run(cold, tmp_path, OK), await run(cold, tmp_path, OK)
        assert pid_of(a) != pid_of(b) and cold.cold_runs == 2 and cold.workers() == []
        await run(tight, tmp_path, OK)
        assert tight.workers() == []  # over the memory budget: retired after its run
        await run(one, tmp_path, OK, name="a")
        await run(one, tmp_path, OK, name="b")
        assert [w.key[0].split("@")[0] for w in one.workers()] == ["default/b"]  # least recently used went
    finally:
        for p in (cold, tight, one):
            await p.close()


async def test_large_inputs_and_results_travel(pool, tmp_path) -> None:
    source = (
        "import numpy as np\n\ndef run(ctx):\n    n = len(ctx.inputs['payload'])\n"
        "    t = {f't{i}': np.full(1 << 20, i, dtype=np.float32) for i in range(4)}\n"
        "    return {'sample_count': n, 'tensors': t}\n"
    )
    outcome = await run(pool, tmp_path, source, name="big", inputs={"payload": "x" * (4 << 20)})
    assert outcome.result.sample_count == 4 << 20
    assert [float(outcome.result.tensors[f"t{i}"][-1]) for i in range(4)] == [0.0, 1.0, 2.0, 3.0]


def test_the_latency_benchmark_measures_every_path(tmp_path) -> None:
    from tether.devtools import bench_latency

    repo = pathlib.Path(__file__).resolve().parents[2]
    lat = bench_latency.run_latency(
        digits_dir=repo / "examples/digits/task",
        data_file=repo / "examples/digits/device_data.npz",
        work=tmp_path,
        runs=5,
        cold_runs=2,
        fresh_runs=1,
        concurrent_runs=2,
    )
    assert [lat[p]["runs"] for p in ("warm", "cold", "fresh")] == [5, 2, 1]
    assert lat["warm_workers"] == 8  # one resident worker per task after the 8-task round
    assert set(bench_latency.HEADLINE) <= set(lat)
    assert lat["warm_worker_rss_bytes"] > 0 and 0 < lat["warm_worker_pss_bytes"] <= lat["warm_worker_rss_bytes"]
    assert lat["warm_overhead_p50_ms"] == lat["warm_p50_ms"] - lat["model_p50_ms"]
    assert bench_latency.table(lat).row_count == 4


async def test_a_dead_zygote_is_started_again_and_running_workers_keep_serving(pool, tmp_path) -> None:
    first = await run(pool, tmp_path, OK)
    old = pool.zygote.pid
    assert old is not None
    os.kill(old, 9)
    await wait_until(lambda: not _alive(old))
    again = await run(pool, tmp_path, OK, state=first.state)  # its worker was forked already: it carries on
    assert pid_of(again) == pid_of(first)
    other = await run(pool, tmp_path, OK, name="other")  # a new worker needs a new zygote
    assert pool.zygote.pid not in (None, old) and pid_of(other) != pid_of(first)


async def test_a_worker_that_died_while_idle_is_replaced_without_failing_a_run(pool, tmp_path) -> None:
    first = await run(pool, tmp_path, OK)
    os.kill(pid_of(first), 9)  # the kernel's OOM killer, an operator, anything outside
    await wait_until(lambda: pool.workers()[0].gone)
    again = await run(pool, tmp_path, OK, state=first.state)
    assert again.result.sample_count == 2 and pid_of(again) != pid_of(first)
