"""The daemon's protocol handling against a scriptable DeviceService on real gRPC (loopback).

The real controller has its own integration test (test_agent_controller.py, once it lands);
here the fake can misbehave on purpose: tampered bytes, dropped streams, failing uploads.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import pathlib
import random

import numpy as np
import pytest
from agent_fakes import BOOTSTRAP, start_fake, wait_until, write_bundle

from tether.agent import client, daemon, results, runs, runtime
from tether.proto.v1 import tether_pb2 as pb
from tether.spec import triggers

FAST = client.Backoff(initial_s=0.02, max_s=0.2)
SIMPLE = """
import numpy as np

def run(ctx):
    ctx.state["runs"] = ctx.state.get("runs", 0) + 1
    counts = {"runs": ctx.state["runs"]}
    return {"sample_count": 2, "metrics": {"m": 1.5}, "tensors": {"t": np.ones(3)}, "counts": counts}
"""


def make_agent(fake, tmp_path: pathlib.Path, data_dir=None, name: str = "dev-1", **kw) -> daemon.Agent:
    return daemon.Agent(
        controller=fake.address,
        state_dir=tmp_path / name / "state",
        data_dir=data_dir or tmp_path / name / "data",
        bootstrap_token=BOOTSTRAP,
        device_id=name,
        attributes={"app": "shop", "os": "android"},
        backends=["mnn/cpu"],
        backoff=FAST,
        rng=random.Random(0),
        **kw,
    )


async def running(agent: daemon.Agent) -> asyncio.Task:
    task = asyncio.create_task(agent.run())
    await wait_until(lambda: agent.connected.is_set() or task.done(), timeout=10)
    return task


async def stop(agent: daemon.Agent, task: asyncio.Task) -> None:
    agent.stop()
    await asyncio.wait_for(task, timeout=15)


async def test_enroll_pull_run_upload_digits(fake, tmp_path, digits_dir, data_dir, digits_data) -> None:
    rel = fake.publish("default/digits-eval", digits_dir)
    agent = make_agent(fake, tmp_path, data_dir)
    task = await running(agent)
    await wait_until(lambda: "SUCCEEDED" in fake.states(rel.name))
    await stop(agent, task)

    assert fake.devices["dev-1"].attributes["app"] == "shop"
    assert list(fake.devices["dev-1"].backends) == ["mnn/cpu"]
    assert fake.states(rel.name, progress=False) == ["INSTALLED", "RUNNING", "SUCCEEDED"]
    (upload,) = fake.uploads.values()
    assert upload.release == rel.name and upload.version == 1 and upload.sample_count == 150
    y = digits_data["y"][:150]
    confusion = {t.name: results.tensor_from_proto(t) for t in upload.tensors}["confusion"]
    assert confusion.sum() == 150 and upload.counts["correct"] == int(np.trace(confusion))
    assert upload.metrics["accuracy"] == pytest.approx(upload.counts["correct"] / 150)
    np.testing.assert_array_equal(confusion.sum(1), np.bincount(y, minlength=10))
    state = json.loads((tmp_path / "dev-1/state/state.json").read_text())
    assert state["credential"].startswith("dev-1.") and state["installed"][rel.name]["version"] == 1

    # Restart: no second enrolment, no second onInstall run, nothing pulled again.
    pulls = len(fake.pulls)
    agent2 = make_agent(fake, tmp_path, data_dir)
    task2 = await running(agent2)
    await asyncio.sleep(0.3)
    await stop(agent2, task2)
    assert fake.enrollments == 1 and len(fake.uploads) == 1 and len(fake.pulls) == pulls


async def test_tampered_blob_is_refused_never_run(fake, tmp_path) -> None:
    bundle = write_bundle(tmp_path / "b", SIMPLE, extra={"weights.bin": b"w" * 10_000})
    rel = fake.publish("ns/t", bundle)
    fake.tamper_blobs.add(next(d for d, data in fake.blobs.items() if data == b"w" * 10_000))
    agent = make_agent(fake, tmp_path)
    task = await running(agent)
    await wait_until(lambda: "REFUSED" in fake.states(rel.name))
    await asyncio.sleep(0.2)
    await stop(agent, task)
    assert "RUNNING" not in fake.states(rel.name) and not fake.uploads
    assert agent.store.current(rel.name) is None and agent.store.releases() == []
    assert agent.state.refused[rel.name]["version"] == 1
    assert fake.states(rel.name).count("REFUSED") == 1  # not retried for the same version


async def test_tampered_manifest_is_refused(fake, tmp_path) -> None:
    rel = fake.publish("ns/t", write_bundle(tmp_path / "b", SIMPLE))
    fake.tamper_manifests.add(rel.digest)
    agent = make_agent(fake, tmp_path)
    task = await running(agent)
    await wait_until(lambda: "REFUSED" in fake.states(rel.name))
    await stop(agent, task)
    assert not fake.pulls and not fake.uploads
    assert "manifest hashes to" in next(m for *_, s, m in fake.statuses if s == "REFUSED")


async def test_interrupted_download_resumes_from_offset(fake, tmp_path) -> None:
    payload = bytes(range(256)) * 200  # 51200 bytes, 13 chunks
    rel = fake.publish("ns/t", write_bundle(tmp_path / "b", SIMPLE, extra={"big.bin": payload}))
    digest = next(d for d, data in fake.blobs.items() if data == payload)
    fake.drop_after[digest] = 5 * fake.chunk_size
    agent = make_agent(fake, tmp_path)
    task = await running(agent)
    await wait_until(lambda: "SUCCEEDED" in fake.states(rel.name))
    await stop(agent, task)
    assert [o for d, o in fake.pulls if d == digest] == [0, 5 * fake.chunk_size]
    assert (agent.store.current_dir(rel.name) / "big.bin").read_bytes() == payload


async def test_new_version_revoke_and_failing_task_isolated(fake, tmp_path) -> None:
    good = fake.publish("ns/good", write_bundle(tmp_path / "g1", SIMPLE))
    bad = fake.publish("ns/bad", write_bundle(tmp_path / "bad", "def run(ctx):\n    raise RuntimeError('boom')\n"))
    agent = make_agent(fake, tmp_path)
    task = await running(agent)
    await wait_until(lambda: "SUCCEEDED" in fake.states(good.name) and "FAILED" in fake.states(bad.name))
    failed_msg = next(m for _, r, _, s, m in fake.statuses if r == bad.name and s == "FAILED")
    assert failed_msg.startswith("RuntimeError: boom")

    # A new version is pushed while connected: installed next to the previous one, run again.
    v2 = fake.publish("ns/good", write_bundle(tmp_path / "g2", SIMPLE + "\n# v2\n"))
    await wait_until(lambda: sum(1 for u in fake.uploads.values() if u.release == good.name) == 2)
    assert agent.store.current(good.name) == 2 and agent.store.versions(good.name) == [1, 2]
    keys = [k for k, u in fake.uploads.items() if u.release == good.name]
    assert len(set(keys)) == 2
    assert [u.counts["runs"] for u in fake.uploads.values() if u.release == good.name] == [1, 2]  # ctx.state kept
    assert v2.version == 2

    fake.revoke(good.name)
    # The install goes first, then its record in the state file: wait for both (a loaded machine sees between).
    await wait_until(lambda: agent.store.current(good.name) is None and good.name not in agent.state.installed)
    await stop(agent, task)


async def test_upload_retried_with_same_key_across_restart(fake, tmp_path) -> None:
    rel = fake.publish("ns/t", write_bundle(tmp_path / "b", SIMPLE))
    fake.fail_uploads = 10_000
    agent = make_agent(fake, tmp_path)
    task = await running(agent)
    await wait_until(lambda: len(fake.upload_attempts) >= 3)
    await stop(agent, task)
    assert len(set(fake.upload_attempts)) == 1
    (record,) = agent.state.runs.values()
    assert record.status == "uploading"

    fake.fail_uploads = 0
    agent2 = make_agent(fake, tmp_path)
    task2 = await running(agent2)
    await wait_until(lambda: fake.uploads)
    await stop(agent2, task2)
    assert list(fake.uploads) == [fake.upload_attempts[0]]
    assert fake.states(rel.name).count("RUNNING") == 1  # not re-run, only re-uploaded


async def test_reconnects_after_controller_restart(tmp_path, digits_dir) -> None:
    server, fake, address = await start_fake()
    fake.address = address
    agent = make_agent(fake, tmp_path)
    task = await running(agent)
    await server.stop(0)
    await wait_until(lambda: not agent.connected.is_set())
    # A new controller process on the same port that knows the device (its database survived).
    import grpc

    from tether.proto.v1 import tether_pb2_grpc as pb_grpc

    server2 = grpc.aio.server()
    pb_grpc.add_DeviceServiceServicer_to_server(fake, server2)
    server2.add_insecure_port(address)
    await server2.start()
    try:
        rel = fake.publish("ns/t", write_bundle(tmp_path / "b", SIMPLE))
        await wait_until(lambda: "SUCCEEDED" in fake.states(rel.name), timeout=20)
        assert fake.enrollments == 1
    finally:
        await stop(agent, task)
        await server2.stop(0)


def test_backoff_is_exponential_jittered_and_capped() -> None:
    b = client.Backoff(initial_s=1, max_s=10, multiplier=2, jitter=0.5)
    rng = random.Random(1)
    delays = [b.delay(n, rng) for n in range(8)]
    for n, d in enumerate(delays):
        base = min(10, 2**n)
        assert base * 0.5 <= d <= base
    assert len({round(d, 6) for d in delays[4:]}) > 1  # jittered, not lock-step


def test_trigger_parsing() -> None:
    assert triggers.Trigger.from_json("") == triggers.Trigger()
    assert triggers.Trigger.from_json('{"type": "interval", "seconds": 30}') == triggers.Trigger("interval", 30.0)
    for bad in ['{"type": "interval"}', '{"type": "cron"}', "[]", "{"]:
        with pytest.raises(Exception, match="trigger"):
            triggers.Trigger.from_json(bad)


# ---------------------------------------------------------------- release policy: trigger and resources

SLEEPER = "import time\n\ndef run(ctx):\n    time.sleep(20)\n    return {'sample_count': 1}\n"
HOG = (
    "import numpy as np\n\ndef run(ctx):\n"
    "    big = np.ones(400 * 1024 * 1024 // 8)\n    return {'sample_count': int(big.sum() > 0)}\n"
)


def failure(fake, release: str) -> str:
    return next(m for _, r, _, s, m in fake.statuses if r == release and s == "FAILED")


async def test_interval_trigger_runs_the_task_again_after_its_interval(fake, tmp_path) -> None:
    interval = {"type": "interval", "seconds": 1}
    rel = fake.publish("ns/tick", write_bundle(tmp_path / "b", SIMPLE), trigger=interval)
    agent = make_agent(fake, tmp_path)
    task = await running(agent)
    await wait_until(lambda: len(fake.uploads) >= 3, timeout=20)
    await stop(agent, task)

    runs = sorted(agent.state.runs_of(rel.name, 1), key=lambda r: r.started_at)
    assert len(runs) >= 3 and {r.trigger for r in runs} == {"interval"}
    gaps = [b.started_at - a.started_at for a, b in itertools.pairwise(runs)]
    assert all(g >= 0.95 for g in gaps), gaps  # not before its interval...
    assert all(g < 5 for g in gaps), gaps  # ...and not much later
    assert [u.counts["runs"] for u in fake.uploads.values()][:3] == [1, 2, 3]
    # The policy is kept with the installed version: a restarted agent runs it the same way before its Sync.
    installed = make_agent(fake, tmp_path).state.installed[rel.name]
    assert json.loads(installed.trigger_json) == interval


async def test_a_release_timeout_below_the_device_cap_kills_the_run(fake, tmp_path) -> None:
    rel = fake.publish("ns/slow", write_bundle(tmp_path / "b", SLEEPER), resources={"timeoutSeconds": 1})
    agent = make_agent(fake, tmp_path, limits=runtime.TaskLimits(timeout_s=30))
    task = await running(agent)
    await wait_until(lambda: "FAILED" in fake.states(rel.name), timeout=15)
    await stop(agent, task)
    assert fake.states(rel.name, progress=False) == ["INSTALLED", "RUNNING", "FAILED"]
    assert failure(fake, rel.name).startswith("task timed out after 1s")
    (record,) = agent.state.runs.values()
    assert record.status == "failed" and record.finished_at - record.started_at < 5
    assert not fake.uploads


async def test_the_device_caps_bound_what_a_release_asks_for(fake, tmp_path) -> None:
    generous = {"timeoutSeconds": 3600, "memoryMB": 4096}
    slow = fake.publish("ns/slow", write_bundle(tmp_path / "s", SLEEPER), resources=generous)
    hog = fake.publish("ns/hog", write_bundle(tmp_path / "h", HOG), resources=generous)
    agent = make_agent(fake, tmp_path, limits=runtime.TaskLimits(timeout_s=1.5, memory_mb=256))
    task = await running(agent)
    await wait_until(lambda: "FAILED" in fake.states(slow.name) and "FAILED" in fake.states(hog.name), timeout=15)
    await stop(agent, task)
    assert failure(fake, slow.name).startswith("task timed out after 1.5s")
    assert failure(fake, hog.name).startswith("MemoryError")
    assert not fake.uploads


async def test_a_policy_the_agent_cannot_honour_is_refused_and_the_agent_keeps_going(fake, tmp_path) -> None:
    bad = {
        "ns/bad-json": ({}, "{not json", "release policy not usable by this agent: resources: not valid JSON"),
        "ns/bad-limit": ({}, {"memoryMB": "lots"}, "resources.memoryMB: must be an integer"),
        "ns/bad-key": ({}, {"gpus": 1}, "resources.gpus: unknown key"),
        "ns/bad-trigger": ({"type": "lunar"}, {}, "trigger: type 'lunar' is not supported"),
        "ns/bad-cron": ({"type": "cron", "schedule": "61 * * * *"}, {}, "trigger.schedule: minute: 61"),
        "ns/bad-interval": ({"type": "interval", "seconds": "60"}, {}, "trigger.seconds: interval seconds"),
    }
    for i, (name, (trigger, resources, _)) in enumerate(bad.items()):
        fake.publish(
            name, write_bundle(tmp_path / f"b{i}", SIMPLE + f"\n# {i}\n"), trigger=trigger, resources=resources
        )
    good = fake.publish("ns/good", write_bundle(tmp_path / "good", SIMPLE), resources={"timeoutSeconds": 30})
    agent = make_agent(fake, tmp_path)
    task = await running(agent)
    await wait_until(lambda: "SUCCEEDED" in fake.states(good.name) and all("REFUSED" in fake.states(n) for n in bad))
    await asyncio.sleep(0.3)
    for name, (*_, message) in bad.items():
        assert fake.states(name) == ["REFUSED"], name  # refused before any download, once
        assert message in next(m for _, r, _, s, m in fake.statuses if r == name and s == "REFUSED")
        assert name not in agent.state.installed and agent.state.refused[name]["version"] == 1
    assert {u.release for u in fake.uploads.values()} == {good.name}

    # Refusal is per version: a corrected policy is installed and run.
    fixed = fake.publish("ns/bad-json", write_bundle(tmp_path / "b0", SIMPLE + "\n# 0\n"), resources={"memoryMB": 256})
    await wait_until(lambda: "SUCCEEDED" in fake.states(fixed.name))
    await stop(agent, task)
    assert fixed.version == 2 and agent.state.installed[fixed.name].version == 2


@pytest.mark.parametrize(
    ("resources", "caps", "limits"),
    [
        ("", runtime.TaskLimits(), runtime.TaskLimits()),
        ("{}", runtime.TaskLimits(timeout_s=9, memory_mb=99), runtime.TaskLimits(timeout_s=9, memory_mb=99)),
        ('{"timeoutSeconds": 5}', runtime.TaskLimits(timeout_s=60), runtime.TaskLimits(timeout_s=5)),
        ('{"timeoutSeconds": 500}', runtime.TaskLimits(timeout_s=60), runtime.TaskLimits(timeout_s=60)),
        ('{"memoryMB": 128}', runtime.TaskLimits(memory_mb=512), runtime.TaskLimits(memory_mb=128)),
        ('{"memoryMB": 4096}', runtime.TaskLimits(memory_mb=512), runtime.TaskLimits(memory_mb=512)),
        ('{"cpuSeconds": 10}', runtime.TaskLimits(), runtime.TaskLimits(cpu_seconds=10)),
        ('{"cpuSeconds": 10}', runtime.TaskLimits(cpu_seconds=3), runtime.TaskLimits(cpu_seconds=3)),
        ('{"cpuSeconds": 2}', runtime.TaskLimits(cpu_seconds=3), runtime.TaskLimits(cpu_seconds=2)),
        ("{}", runtime.TaskLimits(cpu_seconds=3), runtime.TaskLimits(cpu_seconds=3)),
    ],
)
def test_policy_limits_are_the_release_within_the_device_caps(resources, caps, limits) -> None:
    task = pb.DesiredTask(release="ns/t", version=1, resources_json=resources)
    assert runs.Policy.of(task, caps=caps).limits == limits
