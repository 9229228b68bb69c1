"""The round driver on memory storage, a real hub and an injected clock: deadlines, quorum, extension, failure,
RunNow to the selected devices once, the run's end, and the pure decision table."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from tether.common import manifest, tensorfiles
from tether.controller import blobs, blobstores, devices, fanout, hub, release_cache, releases, round_driver
from tether.controller.fl import driver, rounds
from tether.controller.storage import memory
from tether.spec import federation

TASK = "ml/fl"
MODEL = {"w": np.zeros((2, 2), dtype=np.float32)}
DEVICES = ["dev-a", "dev-b", "dev-c"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class Rig:
    storage: object
    hub: hub.Hub
    clock: Clock
    driver: round_driver.RoundDriver
    sent: list[tuple[str, int]]
    queues: dict[str, object]
    store: blobs.FilesystemBlobStore


async def rig(tmp_path: pathlib.Path, *, extra: tuple[str, ...] = (), **federated) -> Rig:
    storage = memory.memory_storage()
    data = tensorfiles.dump(MODEL)
    digest = manifest.sha256_digest(data)
    store = blobs.FilesystemBlobStore(tmp_path / "blobs")
    store.put_stream(digest, [data])
    await storage.bundles.put_blob(digest=digest, size=len(data))
    code = b"def run(ctx):\n    return {'sample_count': 1}\n"
    code_digest = manifest.sha256_digest(code)
    store.put_stream(code_digest, [code])
    await storage.bundles.put_blob(digest=code_digest, size=len(code))
    entries = (
        manifest.FileEntry(path="model.safetensors", sha256=digest, size=len(data)),
        manifest.FileEntry(path="task.py", sha256=code_digest, size=len(code)),
    )
    body = manifest.Manifest(name="fl", entrypoint="task.py", files=entries).canonical_bytes()
    mdigest = await storage.bundles.put_manifest(body=body)
    doc = {"rounds": 2, "participants": {"count": 3}, "quorum": {"count": 2}, "roundDeadlineSeconds": 60, **federated}
    await storage.releases.apply_release(
        releases.parse_spec(
            release=TASK,
            generation=1,
            manifest_digest=mdigest,
            target_json="{}",
            trigger_json=json.dumps({"type": "onDemand"}),
            aggregation_json="{}",
            paused=False,
            federated_json=json.dumps(doc),
        )
    )
    h = hub.Hub()
    queues = {}
    for d in [*DEVICES, *extra]:
        await storage.devices.enroll_device(device_id=d, info=devices.validate_info(attributes={}, backends=[]))
        queues[d] = h.connect(device_id=d, facts=devices.Device(device_id=d, attributes={}, backends=()).facts).queue
    clock = Clock()
    sent: list[tuple[str, int]] = []

    async def send(task: str, number: int) -> None:
        sent.append((task, number))

    d = round_driver.RoundDriver(
        storage=storage,
        releases_=release_cache.ReleaseCache(storage.releases),
        fan_out=fanout.FanOut(
            hub_=h,
            storage=storage,
            manifests=fanout.ManifestCache(bundles=storage.bundles, blob_store=blobstores.as_backend(store)),
        ),
        hub_=h,
        blob_store=blobstores.as_backend(store),
        send_aggregate=send,
        clock=clock,
    )
    return Rig(storage=storage, hub=h, clock=clock, driver=d, sent=sent, queues=queues, store=store)


def rules_of(**doc) -> federation.Federation:
    base = {"rounds": 2, "participants": {"count": 3}, "quorum": {"count": 2}, "roundDeadlineSeconds": 60}
    parsed = federation.parse_federation({**base, **doc})
    assert parsed is not None
    return parsed


def drain(queue) -> list[tuple[str, int]]:
    """What a device's stream was offered, in order: (event kind, version) of each Notify and RunNow."""
    out = []
    while not queue.empty():
        event = queue.get_nowait()
        kind = event.WhichOneof("event") if event is not None else None
        if kind == "notify":
            out.append(("notify", event.notify.task.version))
        elif kind == "run":
            out.append(("run", event.run.version))
    return out


def run_nows(queue) -> list[object]:
    out = []
    while not queue.empty():
        event = queue.get_nowait()
        if event is not None and event.WhichOneof("event") == "run":
            out.append(event.run)
    return out


async def test_a_round_opens_selects_and_tells_each_selected_device_once(tmp_path) -> None:
    r = await rig(tmp_path)
    await r.driver.drive(TASK)
    current = await r.storage.rounds.latest_round(task=TASK)
    assert current is not None and current.number == 1 and current.phase is rounds.Phase.COLLECTING
    assert sorted(current.selected) == DEVICES and current.version == 1 and current.model.startswith("sha256:")
    for d in DEVICES:
        [run] = run_nows(r.queues[d])
        assert run.request_id == "round-1" and run.version == 1
        assert json.loads(run.payload_json) == {
            "federated": {"task": TASK, "round": 1, "modelFile": "model.safetensors", "updateEncoding": "float32"}
        }
    await r.driver.drive(TASK)  # nothing new: nobody is told twice
    assert all(run_nows(r.queues[d]) == [] for d in DEVICES)


async def test_a_round_model_goes_to_its_participants_only(tmp_path) -> None:
    r = await rig(tmp_path, extra=("dev-z",))
    await r.driver.drive(TASK)
    one = await r.storage.rounds.latest_round(task=TASK)
    assert one is not None and len(one.selected) == 3
    [left_out] = sorted(set(r.queues) - set(one.selected))
    for d in one.selected:  # the round's version first, then its RunNow, on the one stream
        assert drain(r.queues[d]) == [("notify", 1), ("run", 1)]
    assert drain(r.queues[left_out]) == []  # not selected: not told

    # A published round becomes the next version: nobody is told until the next round picks its devices.
    rel = await r.storage.releases.get_release(TASK)
    new = tensorfiles.dump({k: v + 1 for k, v in MODEL.items()})
    digest = manifest.sha256_digest(new)
    r.store.put_stream(digest, [new])
    served = await r.driver.serve_model(rel, model_file="model.safetensors", model=digest, size=len(new))
    assert served.version == 2
    assert all(drain(q) == [] for q in r.queues.values())


async def test_quorum_missed_at_the_deadline_extends_then_fails_and_the_next_round_opens(tmp_path) -> None:
    r = await rig(tmp_path, maxExtensions=1)
    rules = rules_of(maxExtensions=1)
    await r.driver.drive(TASK)
    v = await r.storage.rounds.admit_update(task=TASK, number=1, device="dev-a", rules=rules, now=r.clock.now)
    assert v.accepted
    r.clock.now += 61
    await r.driver.drive(TASK)
    one = await r.storage.rounds.round(task=TASK, number=1)
    assert one is not None and one.phase is rounds.Phase.EXTENDED and one.extensions == 1
    assert "quorum missed (1 of 2 updates)" in one.reason
    r.clock.now += 61
    await r.driver.drive(TASK)
    one = await r.storage.rounds.round(task=TASK, number=1)
    assert one is not None and one.phase is rounds.Phase.FAILED
    two = await r.storage.rounds.latest_round(task=TASK)
    assert two is not None and two.number == 2 and two.phase is rounds.Phase.COLLECTING  # the run goes on
    assert two.model == one.model  # from the same global model: nothing was published


async def test_quorum_met_at_the_deadline_aggregates_and_the_run_ends_after_its_rounds(tmp_path) -> None:
    r = await rig(tmp_path, quorum={"count": 2})
    rules = rules_of()
    await r.driver.drive(TASK)
    for d in ("dev-a", "dev-b"):
        await r.storage.rounds.admit_update(task=TASK, number=1, device=d, rules=rules, now=r.clock.now)
    r.clock.now += 61
    await r.driver.drive(TASK)
    one = await r.storage.rounds.round(task=TASK, number=1)
    assert one is not None and one.phase is rounds.Phase.AGGREGATING and r.sent == [(TASK, 1)]
    await r.driver.drive(TASK)
    assert r.sent == [(TASK, 1)]  # not sent again before resend_s
    r.clock.now += 61
    await r.driver.drive(TASK)
    assert r.sent == [(TASK, 1), (TASK, 1)]  # a lost message is healed (the task is idempotent)


def test_decide_covers_every_phase() -> None:
    rules = rules_of()
    base = driver.Situation(task=TASK, rules=rules, serving_model="sha256:" + "a" * 64, serving_version=1, latest=None)
    first = driver.decide(base)
    assert isinstance(first, driver.OpenRound) and first.round.number == 1 and first.round.version == 1
    opened = first.round
    waiting = driver.decide(dataclasses.replace(base, latest=opened, eligible=["x"], now=opened.deadline - 1))
    assert isinstance(waiting, driver.Wait) and "waiting for devices" in waiting.reason
    picked = driver.decide(dataclasses.replace(base, latest=opened, eligible=DEVICES))
    assert isinstance(picked, driver.Move) and picked.round.phase is rounds.Phase.COLLECTING
    collecting = picked.round
    assert isinstance(driver.decide(dataclasses.replace(base, latest=collecting, now=0)), driver.Wait)
    aggregating = dataclasses.replace(collecting, phase=rounds.Phase.AGGREGATING)
    assert isinstance(driver.decide(dataclasses.replace(base, latest=aggregating)), driver.Aggregate)
    published = dataclasses.replace(collecting, phase=rounds.Phase.PUBLISHED)
    result = rounds.RoundResult(model="sha256:" + "b" * 64, samples=3, metrics={})
    advance = driver.decide(dataclasses.replace(base, latest=published, latest_result=result, published=1))
    assert isinstance(advance, driver.Advance) and advance.model == result.model
    served = dataclasses.replace(result, version=2)
    nxt = driver.decide(dataclasses.replace(base, latest=published, latest_result=served, published=1))
    assert isinstance(nxt, driver.OpenRound) and nxt.round.number == 2
    last = dataclasses.replace(published, number=2)
    done = driver.decide(dataclasses.replace(base, latest=last, latest_result=served, published=2))
    assert isinstance(done, driver.Done) and done.reason == "RoundsDone"
    target = rules_of(
        rounds=10,
        stopOn={"metric": "accuracy", "target": 0.9},
        evaluation={"metric": "accuracy", "devices": {"count": 1}},
    )
    stop = driver.decide(
        dataclasses.replace(base, rules=target, latest=published, latest_result=served, published=1, history=[0.95])
    )
    assert isinstance(stop, driver.Done) and stop.reason == "TargetReached"


@pytest.mark.parametrize("phase", [rounds.Phase.FAILED])
def test_a_failed_round_is_followed_by_the_next_from_the_served_model(phase) -> None:
    rules = rules_of(rounds=5)
    failed = rounds.Round(task=TASK, number=2, phase=phase, deadline=0, model="sha256:" + "c" * 64)
    step = driver.decide(
        driver.Situation(task=TASK, rules=rules, serving_model="sha256:" + "d" * 64, serving_version=4, latest=failed)
    )
    assert isinstance(step, driver.OpenRound) and step.round.number == 3 and step.round.model == "sha256:" + "d" * 64


async def test_the_driver_stops_even_when_a_library_turns_its_cancellation_into_an_error(tmp_path) -> None:
    """A database driver that answers a cancelled query with an error (as psycopg may when the server is gone)
    must not keep the loop, and so the controller's shutdown, alive."""
    import asyncio

    r = await rig(tmp_path)

    class Swallowing:
        async def list_releases(self):
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                raise RuntimeError("server closed the connection unexpectedly") from None

    r.driver._storage = dataclasses.replace(r.storage, releases=Swallowing())  # type: ignore[attr-defined]
    task = asyncio.create_task(r.driver.run())
    await asyncio.sleep(0.05)
    task.cancel()  # swallowed by the "library": cancel alone does not end the loop
    await asyncio.sleep(0.05)
    assert not task.done()
    r.driver.stop()
    task.cancel()
    await asyncio.wait_for(task, 5)
