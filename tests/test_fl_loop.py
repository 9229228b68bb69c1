"""The federated loop on real parts: controller (gRPC, PostgreSQL), a Celery worker process, real agents.

Given a federated MLTask (3 rounds, FedAvg, every device each round) whose task
takes one gradient step of a linear model on the device's own data, when it is
applied, then the controller opens each round, selects the devices, tells
them (RunNow), takes their updates (PushUpdate), the worker folds them into
the next global model, and the controller serves it as a new bundle version:
the global model changes every round, equals FedAvg computed here with NumPy,
and each device downloads exactly one blob per round (the model file). The
worker scores every round's model on the held-out set the bundle ships (an
ONNX graph of the model whose output is the sign of the prediction as two
class scores): the round's record, the status and `tether fl history` carry it.
"""

from __future__ import annotations

import asyncio
import io
import pathlib
import time

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from tether.agent import daemon
from tether.agent.client import Backoff
from tether.cli import main as cli_main
from tether.common import admin_client, config, manifest, tensorfiles
from tether.devtools import procs

ADMIN_TOKEN = "admin-token-for-fl"
BOOTSTRAP_TOKEN = "bootstrap-token-for-fl"
TASK = "ml/linear-fl"
ROUNDS = 3
LR = 0.5

TASK_PY = f"""
import pathlib

import numpy as np
import safetensors.numpy as st


def run(ctx):
    fed = ctx.inputs["payload"]["federated"]
    w = st.load_file(str(pathlib.Path(ctx.bundle_dir) / fed["modelFile"]))
    with np.load(pathlib.Path(ctx.data_dir) / "data.npz") as d:
        x, y = d["x"], d["y"]
    weights, bias = w["w"].astype(np.float64), w["b"].astype(np.float64)
    err = x @ weights + bias - y
    grad_w = x.T @ err / len(y)
    grad_b = err.mean(axis=0)
    return {{
        "sample_count": len(y),
        "metrics": {{"loss": float((err ** 2).mean()), "round": float(fed["round"])}},
        "tensors": {{"w": (-{LR} * grad_w).astype(np.float32), "b": (-{LR} * grad_b).astype(np.float32)}},
    }}
"""


def device_data(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    n = 20 + 10 * i
    x = rng.standard_normal((n, 3))
    y = x @ np.array([[1.0], [-2.0], [0.5]]) + 0.3 + 0.01 * rng.standard_normal((n, 1))
    return {"x": x, "y": y}


def fedavg_reference(model: dict[str, np.ndarray], shards: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One FedAvg round computed here: the sample-weighted mean of the devices' deltas, added to the model."""
    total = sum(len(s["y"]) for s in shards)
    acc = {n: np.zeros(a.shape) for n, a in model.items()}
    for s in shards:
        w, b = model["w"].astype(np.float64), model["b"].astype(np.float64)
        err = s["x"] @ w + b - s["y"]
        delta = {
            "w": (-LR * (s["x"].T @ err / len(s["y"]))).astype(np.float32),
            "b": (-LR * err.mean(axis=0)).astype(np.float32),
        }
        for n in acc:
            acc[n] += len(s["y"]) * delta[n].astype(np.float64)
    return {n: (model[n].astype(np.float64) + acc[n] / total).astype(np.float32) for n in model}


def heldout() -> dict[str, np.ndarray]:
    """Inputs and the sign class of their true target (0: positive, 1: not)."""
    rng = np.random.default_rng(99)
    x = rng.standard_normal((200, 3)).astype(np.float32)
    target = x.astype(np.float64) @ np.array([1.0, -2.0, 0.5]) + 0.3
    return {"X": x, "y": (target <= 0).astype(np.int64)}


def sign_graph() -> bytes:
    """The linear model as an ONNX graph with initializers `w` and `b`; two class scores, [pred, -pred] (logits)."""
    nodes = [
        helper.make_node("MatMul", ["X", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["pred"]),
        helper.make_node("Neg", ["pred"], ["neg"]),
        helper.make_node("Concat", ["pred", "neg"], ["scores"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "linear_sign",
        inputs=[helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", 3])],
        outputs=[helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 2])],
        initializer=[
            helper.make_tensor("w", TensorProto.FLOAT, [3, 1], [0.0, 0.0, 0.0]),
            helper.make_tensor("b", TensorProto.FLOAT, [1], [0.0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def sign_accuracy(model: dict[str, np.ndarray], data: dict[str, np.ndarray]) -> float:
    pred = data["X"] @ model["w"] + model["b"]
    scores = np.concatenate([pred, -pred], axis=1)
    return float((scores.argmax(axis=1) == data["y"]).mean())


@pytest.fixture()
async def worker(database_url, broker_url, tmp_path):
    comp = procs.Component(
        "worker",
        procs.tether_argv("worker", "--broker-url", broker_url, "--database-url", database_url, "--pool", "solo"),
        tmp_path / "worker.log",
        env={"TETHER_BLOB_DIR": str(tmp_path / "blobs")},
    ).start()
    try:
        await comp.wait_for(r"worker ready", timeout=60)
        yield comp
    finally:
        comp.stop()


@pytest.fixture()
async def controller(database_url, broker_url, tmp_path, worker, monkeypatch):
    from tether.controller import server

    monkeypatch.setenv("TETHER_FL_DRIVER_INTERVAL", "0.2")
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


async def test_three_rounds_change_the_global_model_as_fedavg_does_one_blob_per_device_and_round(
    controller, tmp_path: pathlib.Path
) -> None:
    shards = [device_data(i) for i in range(3)]
    agents, pulled = [], {}
    for i, shard in enumerate(shards):
        data_dir = tmp_path / f"data{i}"
        data_dir.mkdir()
        np.savez(data_dir / "data.npz", **shard)
        agent = daemon.Agent(
            controller=controller.address,
            state_dir=tmp_path / f"dev{i}",
            data_dir=data_dir,
            bootstrap_token=BOOTSTRAP_TOKEN,
            device_id=f"dev-{i}",
            attributes={"app": "fl"},
            backoff=Backoff(initial_s=0.05, max_s=0.5),
        )
        pulled[f"dev-{i}"] = record_pulls(agent.client)
        agents.append(agent)
    runs = [asyncio.create_task(a.run()) for a in agents]

    bundle = tmp_path / "task"
    bundle.mkdir()
    (bundle / "task.py").write_text(TASK_PY)
    initial = {"w": np.zeros((3, 1), dtype=np.float32), "b": np.zeros(1, dtype=np.float32)}
    (bundle / "model.safetensors").write_bytes(tensorfiles.dump(initial))
    (bundle / "cloud").mkdir()
    held = heldout()
    buf = io.BytesIO()
    np.savez(buf, **held)
    (bundle / "cloud" / "heldout.npz").write_bytes(buf.getvalue())
    (bundle / "cloud" / "sign.onnx").write_bytes(sign_graph())
    body = manifest.hash_directory(bundle, name="linear-fl", entrypoint="task.py")
    federated = {
        "rounds": ROUNDS,
        "participants": {"count": 3},
        "roundDeadlineSeconds": 120,
        "evaluation": {"metric": "accuracy", "server": {"file": "cloud/heldout.npz", "model": "cloud/sign.onnx"}},
    }
    try:
        await asyncio.wait_for(asyncio.gather(*(a.synced.wait() for a in agents)), 30)
        async with admin_client.AdminClient(controller.address, token=ADMIN_TOKEN) as client:
            upload = await client.upload_bundle(bundle, body)
            await client.apply_release(
                release=TASK,
                manifest_digest=upload.digest,
                target={"matchLabels": {"app": "fl"}},
                trigger={"type": "onDemand"},
                federated=federated,
            )
            deadline = time.monotonic() + 120
            while True:
                history = await controller.storage.rounds.rounds_of(task=TASK)
                published = [r for r in history if r.phase.value == "Published"]
                result = await controller.storage.rounds.round_result(task=TASK, number=ROUNDS)
                if len(published) == ROUNDS and result is not None and result.version:
                    break
                assert time.monotonic() < deadline, f"rounds did not complete: {history}"
                await asyncio.sleep(0.2)
            # The run is done: its last model goes to every device (rounds moved only their participants).
            while not all(a.store.current(TASK) == 1 + ROUNDS for a in agents):
                assert time.monotonic() < deadline, "the last model did not reach every device"
                await asyncio.sleep(0.2)
            # The operator re-applying the unchanged MLTask changes nothing (the base is not the round's).
            again = await client.apply_release(
                release=TASK,
                manifest_digest=upload.digest,
                target={"matchLabels": {"app": "fl"}},
                trigger={"type": "onDemand"},
                federated=federated,
            )
            assert not again.changed
            status = await client.get_release_status(TASK)
    finally:
        for a in agents:
            a.stop()
        await asyncio.gather(*runs, return_exceptions=True)

    blobs_dir = controller.blobs
    model = initial
    models = []
    for number in range(1, ROUNDS + 1):
        r = await controller.storage.rounds.round(task=TASK, number=number)
        res = await controller.storage.rounds.round_result(task=TASK, number=number)
        assert r is not None and res is not None
        assert sorted(r.received) == ["dev-0", "dev-1", "dev-2"] and r.refused == 0
        got = tensorfiles.load(blobs_dir.path_for(res.model).read_bytes())
        want = fedavg_reference(model, shards)
        for n in want:
            np.testing.assert_allclose(got[n], want[n], rtol=1e-6, atol=1e-7)
        assert res.samples == sum(len(s["y"]) for s in shards)
        assert res.metrics["round"] == number  # sample-weighted device metrics
        # scored in the cloud: the new model on the held-out set; logits, so accuracy and no loss
        assert res.evaluation_error == "" and res.evaluation is not None and set(res.evaluation) == {"accuracy"}
        assert res.evaluation["accuracy"] == pytest.approx(sign_accuracy(got, held))
        models.append(res.model)
        model = got
    assert len(set(models)) == ROUNDS  # the global model changed every round

    rel = await controller.storage.releases.get_release(TASK)
    assert rel is not None and rel.version == 1 + ROUNDS  # one derived version per round, nothing else
    # Round 1 trained on the bundle as installed (all its blobs); after that each published round's version moved
    # one blob, its model (the last one is the model the release serves when the run is done).
    first_bundle = {f.sha256 for f in manifest.Manifest.from_bytes(body.canonical_bytes()).files}
    for device, digests in pulled.items():
        assert set(digests[: len(first_bundle)]) == first_bundle, device
        assert digests[len(first_bundle) :] == models, device

    # Status: the rounds and their history, as the admin API and `tether fl history` show them.
    fed = status.federated
    assert fed is not None and fed["round"] == ROUNDS and fed["phase"] == "Published"
    assert [h["round"] for h in fed["history"]] == [1, 2, 3]
    assert [h["model"] for h in fed["history"]] == models and all(h["updates"] == 3 for h in fed["history"])
    scores = [h["evaluation"]["accuracy"] for h in fed["history"]]
    assert [h["value"] for h in fed["history"]] == scores and fed["metric"] == "accuracy"
    assert scores[-1] > sign_accuracy(initial, held)  # the rounds taught it something
    runner = CliRunner()
    args = ["fl", "history", TASK, "--controller", controller.address, "--admin-token", ADMIN_TOKEN, "--csv"]
    out = await asyncio.to_thread(runner.invoke, cli_main.cli, args)
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0] == "round,phase,participants,updates,refused,samples,server_accuracy,loss,round,epsilon"
    assert [float(line.split(",")[6]) for line in lines[1:]] == pytest.approx(scores, abs=1e-5)
    assert [line.split(",")[:4] for line in lines[1:]] == [[str(n), "Published", "3", "3"] for n in (1, 2, 3)]

    # Any round's model can be exported, and served again.
    exported = tmp_path / "round2.safetensors"
    args = ["fl", "export", TASK, "--round", "2", "-o", str(exported)]
    out = await asyncio.to_thread(
        runner.invoke, cli_main.cli, [*args, "--controller", controller.address, "--admin-token", ADMIN_TOKEN]
    )
    assert out.exit_code == 0, out.output
    assert manifest.sha256_digest(exported.read_bytes()) == models[1]
    async with admin_client.AdminClient(controller.address, token=ADMIN_TOKEN) as client:
        base = tmp_path / "round0.safetensors"
        assert await client.export_round_model(TASK, 0, base) == manifest.sha256_digest(base.read_bytes())
        assert tensorfiles.load(base.read_bytes()).keys() == initial.keys()
        back = await client.rollback_round(TASK, 1)
        assert back.model == models[0] and back.version == 2 + ROUNDS and back.cancelled_round == 0
    rel = await controller.storage.releases.get_release(TASK)
    assert rel is not None and rel.version == 2 + ROUNDS
    served = await controller.storage.bundles.get_manifest(rel.manifest_digest)
    assert (
        served is not None and manifest.Manifest.from_bytes(served.body).file("model.safetensors").sha256 == models[0]
    )


def record_pulls(client) -> list[str]:
    """Wrap a DeviceClient's blob pulls: the digests it asked for, in order."""
    asked: list[str] = []
    pull_blob, pull_blobs = client.pull_blob, client.pull_blobs

    def one(*, release, digest, **kw):
        asked.append(digest)
        return pull_blob(release=release, digest=digest, **kw)

    def many(*, release, blobs, **kw):
        asked.extend(d for d, offset in blobs if offset == 0)
        return pull_blobs(release=release, blobs=blobs, **kw)

    client.pull_blob, client.pull_blobs = one, many
    return asked
