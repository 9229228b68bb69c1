"""Simulated fleets: varied attributes, data shards, bounded workers, clean stop."""

from __future__ import annotations

import asyncio

import numpy as np
from agent_fakes import BOOTSTRAP, start_fake, wait_until

from tether.agent import client
from tether.devtools import fleet


def test_attributes_are_varied_and_deterministic() -> None:
    attrs = [fleet.device_attributes(i) for i in range(200)]
    assert attrs == [fleet.device_attributes(i) for i in range(200)]
    for key in ("os", "app", "tier", "region"):
        assert len({a[key] for a in attrs}) > 1
    assert {a["os"] for a in attrs} == {"android", "ios"} and {a["app"] for a in attrs} == {"shop", "maps"}
    assert set(attrs[0]) == {"os", "osVersion", "app", "appVersion", "model", "tier", "region"}


def test_shards_partition_the_dataset(tmp_path, digits_data) -> None:
    devices = fleet.prepare_devices(count=7, state_root=tmp_path, data=fleet_data(tmp_path, digits_data))
    assert len({d.device_id for d in devices}) == 7
    ys = []
    for d in devices:
        with np.load(d.data_dir / "digits.npz") as npz:
            assert npz["X"].dtype == np.float32 and len(npz["X"]) == len(npz["y"])
            ys.append(npz["y"])
    assert sorted(np.concatenate(ys).tolist()) == sorted(digits_data["y"].tolist())


def fleet_data(tmp_path, digits_data):
    path = tmp_path / "device_data.npz"
    np.savez(path, **digits_data)
    return path


async def test_fleet_runs_digits_on_every_device(tmp_path, digits_dir, digits_data) -> None:
    server, fake, address = await start_fake()
    rel = fake.publish("default/digits-eval", digits_dir)
    stop = asyncio.Event()
    ready = []
    run = asyncio.create_task(
        fleet.run_fleet(
            count=4,
            controller=address,
            bootstrap_token=BOOTSTRAP,
            state_root=tmp_path / "devices",
            data=fleet_data(tmp_path, digits_data),
            concurrency=2,
            stop=stop,
            on_ready=ready.append,
            backoff=client.Backoff(initial_s=0.02, max_s=0.2),
        )
    )
    try:
        # A device uploads, then reports SUCCEEDED: wait for the last report, not the last upload.
        await wait_until(lambda: fake.states(rel.name).count("SUCCEEDED") == 4, timeout=60)
        assert ready and len(ready[0]) == 4
        assert sum(u.sample_count for u in fake.uploads.values()) == len(digits_data["y"])
        assert len({u.idempotency_key.split(":")[0] for u in fake.uploads.values()}) == 4
        assert fake.states(rel.name).count("SUCCEEDED") == 4
    finally:
        stop.set()
        agents = await asyncio.wait_for(run, timeout=20)
        await server.stop(0)
    assert all(not a.connected.is_set() for a in agents)
