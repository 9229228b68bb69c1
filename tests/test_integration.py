"""The walking skeleton on real parts, in one test process plus a Celery worker process.

Given a real controller (gRPC on loopback, PostgreSQL), a real Celery worker with a
real broker, and real agents running MNN, when a release targeting `app=shop` is
applied, then exactly the shop devices receive the push, pull, run the model and
upload, and the stored aggregate equals what this test computes independently
with ONNX Runtime (a different engine) on the same per-device data.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import onnxruntime as ort
import pytest

from tether.agent import daemon
from tether.agent.client import Backoff
from tether.cli.demo import example_dir
from tether.common import admin_client, bundle_files, config
from tether.devtools import procs

ADMIN_TOKEN = "admin-token-for-integration"
BOOTSTRAP_TOKEN = "bootstrap-token-for-integration"


@pytest.fixture()
async def worker(database_url, broker_url, tmp_path):
    comp = procs.Component(
        "worker",
        procs.tether_argv("worker", "--broker-url", broker_url, "--database-url", database_url, "--pool", "solo"),
        tmp_path / "worker.log",
    ).start()
    try:
        await comp.wait_for(r"worker ready", timeout=60)
        yield comp
    finally:
        comp.stop()


@pytest.fixture()
async def controller(database_url, broker_url, tmp_path, worker):
    from tether.controller import server

    cfg = config.ControllerConfig(
        database_url=database_url,
        broker_url=broker_url,
        admin_token=ADMIN_TOKEN,
        bootstrap_token=BOOTSTRAP_TOKEN,
        listen="127.0.0.1:0",
        blob_dir=tmp_path / "blobs",
        grace_s=0.5,
    )
    running = await server.start_controller(cfg)
    try:
        yield running
    finally:
        await running.stop(grace=0.5)


def _shards(n: int) -> list[dict[str, np.ndarray]]:
    with np.load(example_dir() / "device_data.npz") as npz:
        X, y = npz["X"], npz["y"]
    idx = np.array_split(np.arange(len(y))[: 60 * n], n)
    return [{"X": X[i], "y": y[i]} for i in idx]


def _expected(shards: list[dict[str, np.ndarray]]) -> dict:
    """The aggregate, computed here with ONNX Runtime and NumPy only."""
    session = ort.InferenceSession(str(example_dir() / "task" / "model.onnx"), providers=["CPUExecutionProvider"])
    n, acc, correct, probs, conf = [], [], [], [], []
    for shard in shards:
        p = session.run(None, {session.get_inputs()[0].name: shard["X"].astype(np.float32)})[0]
        pred = p.argmax(axis=1)
        c = np.zeros((10, 10))
        np.add.at(c, (shard["y"], pred), 1)
        n.append(len(shard["y"]))
        acc.append(float((pred == shard["y"]).mean()))
        correct.append(int((pred == shard["y"]).sum()))
        probs.append(p.mean(axis=0))
        conf.append(c)
    w = np.array(n, dtype=float)
    return {
        "samples": int(w.sum()),
        "accuracy": float(np.average(acc, weights=w)),
        "correct": sum(correct),
        "mean_probs": np.average(np.array(probs), axis=0, weights=w),
        "confusion": np.average(np.array(conf), axis=0, weights=w),
    }


async def test_push_pull_run_upload_aggregate(controller, tmp_path):
    shop, maps = _shards(3), _shards(1)
    agents = []
    for i, shard in enumerate([*shop, *maps]):
        data_dir = tmp_path / f"data{i}"
        data_dir.mkdir()
        np.savez(data_dir / "digits.npz", **shard)
        agents.append(
            daemon.Agent(
                controller=controller.address,
                state_dir=tmp_path / f"dev{i}",
                data_dir=data_dir,
                bootstrap_token=BOOTSTRAP_TOKEN,
                device_id=f"dev-{i}",
                attributes={"app": "shop" if i < len(shop) else "maps", "os": "android"},
                backoff=Backoff(initial_s=0.05, max_s=0.5),
            )
        )
    runs = [asyncio.create_task(a.run()) for a in agents]
    try:
        await asyncio.wait_for(asyncio.gather(*(a.synced.wait() for a in agents)), 30)
        bundle = example_dir() / "task"
        manifest = bundle_files.build_manifest(bundle)
        async with admin_client.AdminClient(controller.address, token=ADMIN_TOKEN) as client:
            await client.upload_bundle(bundle, manifest)
            await client.apply_release(
                release="default/digits",
                manifest_digest=manifest.digest,
                generation=1,
                target={"matchLabels": {"app": "shop"}},
                trigger={"type": "onInstall"},
                aggregation={"tensors": "weightedMean", "metrics": "weightedMean", "counts": "sum"},
                paused=False,
            )
            deadline = time.monotonic() + 60
            while True:
                status = await client.get_release_status("default/digits")
                # Devices upload, then report SUCCEEDED: wait for both.
                if status.aggregate and status.aggregate["results"] == len(shop) and status.succeeded == len(shop):
                    break
                assert time.monotonic() < deadline, f"no complete aggregate: {status}"
                await asyncio.sleep(0.2)
    finally:
        for a in agents:
            a.stop()
        await asyncio.gather(*runs, return_exceptions=True)

    assert (status.targeted, status.installed, status.succeeded, status.failed) == (3, 3, 3, 0)
    body = status.aggregate
    want = _expected(shop)
    assert body["devices"] == 3 and body["samples"] == want["samples"]
    assert body["counts"] == {"samples": want["samples"], "correct": want["correct"]}
    assert body["metrics"]["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)
    np.testing.assert_allclose(body["tensors"]["mean_probs"]["values"], want["mean_probs"], atol=1e-5)
    np.testing.assert_allclose(
        np.reshape(body["tensors"]["confusion"]["values"], body["tensors"]["confusion"]["shape"]),
        want["confusion"],
        atol=1e-9,
    )
    # The maps device was never targeted: nothing installed there.
    shop_state = json.loads((tmp_path / "dev0" / "state.json").read_text())
    maps_state = json.loads((tmp_path / f"dev{len(shop)}" / "state.json").read_text())
    assert "default/digits" in shop_state["installed"]
    assert maps_state["installed"] == {} and maps_state["runs"] == {}
