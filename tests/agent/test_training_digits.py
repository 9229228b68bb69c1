"""On-device training (examples/digits-train): MNN really learns, the update is a weights delta, and the
sample-weighted mean of deltas that the aggregator computes is the FedAvg update."""

from __future__ import annotations

import base64
import importlib.util
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tether.agent import runtime
from tether.common import bundle_files

REPO = pathlib.Path(__file__).resolve().parents[2]
TRAIN = REPO / "examples" / "digits-train" / "task"


def _task_module():
    spec = importlib.util.spec_from_file_location("digits_train_task", TRAIN / "task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shard(tmp_path: pathlib.Path, digits_data, lo: int, hi: int) -> pathlib.Path:
    d = tmp_path / f"data-{lo}-{hi}"
    d.mkdir()
    np.savez(d / "digits.npz", X=digits_data["X"][lo:hi], y=digits_data["y"][lo:hi])
    return d


async def train(tmp_path, data_dir, payload=None, state=None):
    return await runtime.run_task(
        bundle_dir=TRAIN,
        bundle=bundle_files.build_manifest(TRAIN),
        data_dir=data_dir,
        state=state,
        limits=runtime.TaskLimits(timeout_s=120, memory_mb=1024),
        work_dir=tmp_path,
        inputs={"payload": payload or {}},
    )


def test_the_training_bundle_shares_the_eval_model_blob(digits_dir) -> None:
    train_files = {f.path: f.sha256 for f in bundle_files.build_manifest(TRAIN).files}
    eval_files = {f.path: f.sha256 for f in bundle_files.build_manifest(digits_dir).files}
    assert train_files["model.mnn"] == eval_files["model.mnn"]  # downloaded once per device


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
async def test_local_training_lowers_the_loss_and_uploads_a_delta(tmp_path, digits_data, optimizer) -> None:
    data = shard(tmp_path, digits_data, 0, 300)
    lr = 0.05 if optimizer == "sgd" else 0.005
    out = await train(tmp_path, data, {"epochs": 3, "optimizer": optimizer, "lr": lr})
    m = out.result.metrics
    assert m["loss_after"] < 0.9 * m["loss_before"], m
    assert out.result.sample_count == 300 and out.result.counts["steps"] == 3 * 10
    shapes = {k: v.shape for k, v in out.result.tensors.items()}
    assert shapes == {"delta/0": (10,), "delta/1": (10, 32, 1, 1), "delta/2": (32,), "delta/3": (32, 64, 1, 1)}
    assert all(np.abs(v).max() > 0 for v in out.result.tensors.values())
    assert out.state == {"rounds": 1}


async def test_applying_the_update_gives_the_trained_model(tmp_path, digits_data) -> None:
    data = shard(tmp_path, digits_data, 0, 200)
    out = await train(tmp_path, data, {"epochs": 2})
    task = _task_module()
    module, MNN = task.load_trainable(str(TRAIN / "model.mnn"))
    F = MNN.expr
    X = digits_data["X"][:200].astype(np.float32)
    y = digits_data["y"][:200].astype(np.int64)
    base = [np.array(p.read(), dtype=np.float64) for p in module.parameters]
    loss0, _ = task.mean_loss(module, MNN, X, y)
    updated = [b + out.result.tensors[f"delta/{i}"] for i, b in enumerate(base)]
    assert module.load_parameters([F.const(u.astype(np.float32), list(u.shape), F.NCHW, F.float) for u in updated])
    loss1, acc1 = task.mean_loss(module, MNN, X, y)
    assert loss0 == pytest.approx(out.result.metrics["loss_before"], rel=1e-5)
    assert loss1 == pytest.approx(out.result.metrics["loss_after"], rel=1e-4)
    assert acc1 == pytest.approx(out.result.metrics["accuracy_after"])


async def test_weighted_mean_of_device_deltas_is_fedavg(tmp_path, digits_data) -> None:
    from tether.controller import aggregation

    shards = [(0, 100), (100, 300), (300, 360)]
    outcomes = [await train(tmp_path, shard(tmp_path, digits_data, lo, hi), {"epochs": 1}) for lo, hi in shards]
    acc = aggregation.Accumulator()
    for i, o in enumerate(outcomes):
        rejected = acc.add(
            aggregation.RawResult(  # as the controller stores an upload (docs/internals.md, tensor encoding)
                result_id=i,
                device_id=f"d{i}",
                sample_count=o.result.sample_count,
                metrics=dict(o.result.metrics),
                counts=dict(o.result.counts),
                tensors=[
                    {"name": n, "shape": list(v.shape), "data": base64.b64encode(v.astype("<f8").tobytes()).decode()}
                    for n, v in o.result.tensors.items()
                ],
            )
        )
        assert rejected is None
    body = acc.finish(aggregation.AggregationSpec.from_json({"tensors": "weightedMean"}))
    n = np.array([o.result.sample_count for o in outcomes], dtype=np.float64)
    for name in outcomes[0].result.tensors:
        fedavg = sum(w * o.result.tensors[name] for w, o in zip(n, outcomes, strict=True)) / n.sum()
        got = np.asarray(body["tensors"][name]["values"]).reshape(body["tensors"][name]["shape"])
        np.testing.assert_allclose(got, fedavg, rtol=1e-12)
    assert body["samples"] == 360


def test_without_lazy_eval_mnn_optimizer_steps_do_nothing() -> None:
    """Why the example calls MNN.expr.lazy_eval(True): MNN gives no error, the weights just never move."""
    script = f"""
import sys, numpy as np, MNN
F = MNN.expr
if sys.argv[1] == "lazy":
    F.lazy_eval(True)
v = F.load_as_dict({str(TRAIN / "model.mnn")!r})
m = MNN.nn.load_module([v["input"]], [v["probs"]], True)
opt = MNN.optim.SGD(m, 0.1, 0.0, 0.0)
before = [np.array(p.read(), copy=True) for p in m.parameters]
x = F.const(np.random.default_rng(0).random((8, 64), dtype=np.float32), [8, 64], F.NCHW, F.float)
t = F.one_hot(F.const(np.arange(8, dtype=np.int32), [8], F.NCHW, F.int), 10, 1.0, 0.0)
opt.step(MNN.nn.loss.cross_entropy(m.forward(x), t))
print("MOVED", max(float(np.abs(np.array(p.read()) - b).max()) for p, b in zip(m.parameters, before)))
"""
    moved = {}
    for mode in ("eager", "lazy"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120)
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("MOVED"))
        moved[mode] = float(line.split()[1])
    assert moved["eager"] == 0.0 and moved["lazy"] > 0.0
