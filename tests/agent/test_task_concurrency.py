"""Concurrency with limits: the device-wide fair cap on runs, a bundle's runtime (isolation, overlap)."""

from __future__ import annotations

import asyncio
import json

import pytest
from agent_fakes import wait_until, write_bundle
from test_agent_daemon import make_agent, running, stop

from tether.agent import slots
from tether.common import bundle_files, errors, manifest
from tether.proto.v1 import tether_pb2 as pb


async def test_fair_slots_serve_tasks_round_robin() -> None:
    fair = slots.FairSlots(1)
    order: list[str] = []
    await fair.acquire("holder")

    async def one(task: str, n: int) -> None:
        async with fair.hold(task):
            order.append(f"{task}{n}")

    waiters = [asyncio.create_task(one("a", n)) for n in range(3)] + [asyncio.create_task(one("b", 0))]
    await wait_until(lambda: sum(fair.waiting().values()) == 4)
    fair.release()
    await asyncio.gather(*waiters)
    assert order == ["a0", "b0", "a1", "a2"]  # b does not wait behind all of a's runs
    assert fair.in_use == 0


async def test_fair_slots_cap_and_cancellation() -> None:
    fair = slots.FairSlots(2)
    await fair.acquire("a")
    await fair.acquire("b")
    third = asyncio.create_task(fair.acquire("c"))
    fourth = asyncio.create_task(fair.acquire("d"))
    await wait_until(lambda: fair.waiting() == {"c": 1, "d": 1})
    third.cancel()
    await asyncio.gather(third, return_exceptions=True)
    fair.release()
    await fourth  # the cancelled waiter took nothing
    assert fair.in_use == 2 and fair.waiting() == {}
    with pytest.raises(ValueError, match="at least 1"):
        slots.FairSlots(0)


def test_runtime_needs_in_bundle_yaml_and_manifest(tmp_path) -> None:
    plain = bundle_files.build_manifest(write_bundle(tmp_path / "plain", "def run(ctx):\n    return {}\n"))
    assert "runtime" not in plain.to_json()  # digests of bundles that do not set it are unchanged
    assert plain.runtime == manifest.RuntimeNeeds(isolation="warm", concurrency=1)
    b = write_bundle(tmp_path / "set", "def run(ctx):\n    return {}\n")
    (b / "bundle.yaml").write_text("name: t\nentrypoint: task.py\nruntime: {isolation: fresh, concurrency: 3}\n")
    m = bundle_files.build_manifest(b)
    assert m.runtime == manifest.RuntimeNeeds(isolation="fresh", concurrency=3)
    assert manifest.Manifest.from_bytes(m.canonical_bytes()).runtime == m.runtime
    for bad, message in [
        ("{isolation: thread}", r"runtime.isolation: 'thread' not in \['warm', 'fresh'\]"),
        ("{concurrency: 0}", r"runtime.concurrency: must be an integer in \[1, 16\]"),
        ("{concurrency: true}", r"runtime.concurrency"),
        ("{threads: 2}", r"runtime: unknown fields \['threads'\]"),
        ("fresh", r"runtime: must be a mapping"),
    ]:
        (b / "bundle.yaml").write_text(f"name: t\nentrypoint: task.py\nruntime: {bad}\n")
        with pytest.raises(errors.InvalidManifest, match=message):
            bundle_files.build_manifest(b)


BARRIER_TASK = """
import os, pathlib, time

def run(ctx):
    here = pathlib.Path(ctx.inputs["payload"]["dir"])
    (here / ctx.inputs["trigger"]["requestId"]).write_text("")
    deadline = time.monotonic() + float(ctx.inputs["payload"]["wait"])
    while len(list(here.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    return {"sample_count": 1, "counts": {"seen": len(list(here.iterdir())), "pid": os.getpid()}}
"""


def run_now(fake, release: str, request_id: str, payload: dict) -> None:
    run = pb.RunNow(release=release, version=1, request_id=request_id, payload_json=json.dumps(payload))
    fake.queues["dev-1"].put_nowait(pb.ServerEvent(run=run))


@pytest.mark.parametrize(("concurrency", "isolation"), [(2, "warm"), (1, "fresh")])
async def test_runs_of_one_task_overlap_only_when_its_bundle_says_so(fake, tmp_path, concurrency, isolation) -> None:
    b = write_bundle(tmp_path / "b", BARRIER_TASK)
    (b / "bundle.yaml").write_text(
        f"name: t\nentrypoint: task.py\nruntime: {{isolation: {isolation}, concurrency: {concurrency}}}\n"
    )
    rel = fake.publish("ns/overlap", b, trigger={"type": "onDemand"})
    agent = make_agent(fake, tmp_path, task_slots=4)
    task = await running(agent)
    await wait_until(lambda: "INSTALLED" in fake.states(rel.name))
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    # Serialized runs would each wait out the full 2 s barrier alone; overlapping ones meet at once.
    payload = {"dir": str(barrier), "wait": 2 if concurrency == 1 else 60}
    run_now(fake, rel.name, "r1", payload)
    run_now(fake, rel.name, "r2", payload)
    await wait_until(lambda: len(fake.uploads) == 2, timeout=60)
    warm_workers = len(agent.workers.workers())
    await stop(agent, task)
    seen = sorted(u.counts["seen"] for u in fake.uploads.values())
    if concurrency == 2:
        assert seen == [2, 2] and warm_workers == 2  # both ran at once, each on a warm worker of its own
    else:
        assert seen == [1, 2] and warm_workers == 0  # one after the other, each in a fresh interpreter


async def test_the_agent_starts_a_warm_worker_before_the_first_trigger(fake, tmp_path) -> None:
    source = "import os\n\ndef run(ctx):\n    return {'sample_count': 1, 'counts': {'pid': os.getpid()}}\n"
    rel = fake.publish("ns/ahead", write_bundle(tmp_path / "b", source), trigger={"type": "onDemand"})
    agent = make_agent(fake, tmp_path)
    task = await running(agent)
    await wait_until(lambda: len(agent.workers.workers()) == 1)  # installed, not yet triggered: started ahead
    (worker,) = agent.workers.workers()
    assert not fake.uploads
    run_now(fake, rel.name, "r1", {})
    await wait_until(lambda: len(fake.uploads) == 1)
    await stop(agent, task)
    (upload,) = fake.uploads.values()
    assert upload.counts["pid"] == worker.pid
    assert agent.workers.workers() == []  # the agent stopped: so did its workers


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--warm-memory-budget", "5 parsecs"], "Invalid value for '--warm-memory-budget': unknown unit 'parsecs'"),
        (["--task-slots", "0"], "Invalid value for '--task-slots'"),
        (["--warm-workers", "-1"], "Invalid value for '--warm-workers'"),
        (["--worker-idle-seconds", "0"], "Invalid value for '--worker-idle-seconds'"),
        (["--isolation", "thread"], "Invalid value for '--isolation'"),
    ],
)
def test_agent_run_refuses_bad_worker_settings(args, message) -> None:
    from click.testing import CliRunner

    from tether.cli.agent_cmd import agent as agent_cli

    result = CliRunner().invoke(agent_cli, ["run", *args])
    assert result.exit_code == 2 and message in result.output, result.output
