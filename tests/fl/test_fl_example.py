"""examples/digits-fl: the task trains in rounds (in-process FedAvg), runs in the real task worker, and its
manifest, round-0 weights and held-out set are what the build script and the MLTask schema say."""

from __future__ import annotations

import importlib.util
import itertools
import pathlib
import shutil
import subprocess
import sys
import types
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file

from tether.agent import runtime
from tether.common import bundle_files
from tether.controller.fl import aggregators, sampling, updates
from tether.devtools import fldata
from tether.operator import validate
from tether.spec import strategies

REPO = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "digits-fl"
TASK = EXAMPLE / "task"
MODEL = "model.safetensors"


@pytest.fixture(scope="module")
def task() -> types.ModuleType:
    sys.path.insert(0, str(TASK))  # the bundle's own modules sit next to its entrypoint, as in the worker
    try:
        spec = importlib.util.spec_from_file_location("digits_fl_task", TASK / "task.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(TASK))


@pytest.fixture(scope="module")
def split() -> fldata.Split:
    return fldata.digits_split()


def _data_dir(root: pathlib.Path, shard: fldata.Shard) -> pathlib.Path:
    d = root / "data" / shard.device
    d.mkdir(parents=True, exist_ok=True)
    np.savez(d / "digits.npz", X=shard.X, y=shard.y)
    return d


def _ctx(bundle: pathlib.Path, data: pathlib.Path, payload: dict[str, Any]) -> Any:
    return types.SimpleNamespace(
        inputs={"payload": payload}, bundle_dir=str(bundle), data_dir=str(data), state={}, log=lambda _m: None
    )


def test_the_task_trains_over_federated_rounds_in_process(tmp_path, task, split) -> None:
    """Five FedAvg rounds of 10 devices (5 local epochs, to see it in few rounds): each device's run lowers its
    local loss, the global model's held-out loss falls every round and its accuracy rises; each round's model is
    written back into the bundle's safetensors, where the next round's runs read it."""
    bundle = tmp_path / "bundle"
    shutil.copytree(TASK, bundle)
    fltrain = sys.modules["fltrain"]
    heldout = np.load(bundle / "cloud" / "heldout.npz")
    first = fltrain.evaluate(load_file(bundle / "model.safetensors"), heldout["X"], heldout["y"])
    shards = {s.device: s for s in split.shards}
    state = aggregators.ServerState()
    history = [first]
    for r in range(5):
        chosen = sampling.sample(eligible=shards, k=10, seed=0, task="default/digits-fl", round_number=r + 1)
        global_model = load_file(bundle / "model.safetensors")
        contributions = []
        for device in sorted(chosen):
            payload = {"epochs": 5, "federated": {"task": "default/digits-fl", "round": r + 1, "modelFile": MODEL}}
            out = task.run(_ctx(bundle, _data_dir(tmp_path, shards[device]), payload))
            assert out["sample_count"] == len(shards[device].y)
            assert out["metrics"]["loss"] < out["metrics"]["eval_loss"], (device, out["metrics"])
            # federated evaluation: the received global model on the device's own data, before training
            local = fltrain.evaluate(global_model, shards[device].X, shards[device].y)
            assert out["metrics"]["eval_accuracy"] == pytest.approx(local["accuracy"])
            assert {k: v.dtype for k, v in out["tensors"].items()} == {k: np.float32 for k in fltrain.NAMES}
            contributions.append(updates.Update(device=device, delta=out["tensors"], samples=out["sample_count"]))
        outcome = aggregators.aggregate(
            strategies.FedAvg(), global_model=global_model, contributions=contributions, state=state
        )
        state = outcome.state
        save_file({k: np.ascontiguousarray(v) for k, v in outcome.model.items()}, bundle / "model.safetensors")
        history.append(fltrain.evaluate(outcome.model, heldout["X"], heldout["y"]))
    assert history[-1]["loss"] < 0.85 * history[0]["loss"], history
    assert history[-1]["accuracy"] > history[0]["accuracy"] + 0.15, history
    assert all(b["loss"] < a["loss"] for a, b in itertools.pairwise(history)), history


def test_a_round_is_reproducible_and_fedprox_stays_closer_to_the_global_model(tmp_path, task, split) -> None:
    shard = max(split.shards, key=lambda s: len(s.y))
    data = _data_dir(tmp_path, shard)
    a = task.run(_ctx(TASK, data, {"round": 3, "epochs": 5}))
    b = task.run(_ctx(TASK, data, {"round": 3, "epochs": 5}))
    c = task.run(_ctx(TASK, data, {"round": 4, "epochs": 5}))
    prox = task.run(_ctx(TASK, data, {"epochs": 5, "federated": {"round": 3, "proximalMu": 1.0}}))

    def norm(out: dict[str, Any]) -> float:
        return updates.l2_norm(out["tensors"])

    assert all(np.array_equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"])
    assert any(not np.array_equal(a["tensors"][k], c["tensors"][k]) for k in a["tensors"])
    assert 0.0 < norm(prox) < 0.95 * norm(a)


def test_local_dp_clips_the_delta_and_adds_noise(tmp_path, task, split) -> None:
    data = _data_dir(tmp_path, max(split.shards, key=lambda s: len(s.y)))
    plain = task.run(_ctx(TASK, data, {"epochs": 5, "federated": {"round": 2}}))
    clipped = task.run(_ctx(TASK, data, {"epochs": 5, "federated": {"round": 2, "clipNorm": 0.01}}))
    noised = task.run(
        _ctx(TASK, data, {"epochs": 5, "federated": {"round": 2, "clipNorm": 0.01, "noiseMultiplier": 1.0}})
    )
    assert updates.l2_norm(plain["tensors"]) > 0.01
    assert updates.l2_norm(clipped["tensors"]) == pytest.approx(0.01, rel=1e-4)
    # N(0, 0.01²) on ~2,400 values: a norm near 0.01·sqrt(2410) ≈ 0.49, far above the clipped delta's
    assert updates.l2_norm(noised["tensors"]) > 0.2
    assert {k: v.dtype for k, v in noised["tensors"].items()} == {k: np.float32 for k in noised["tensors"]}


def test_bad_weights_and_hyper_parameters_are_refused_with_the_name(tmp_path, task, split) -> None:
    data = _data_dir(tmp_path, split.shards[0])
    bundle = tmp_path / "bundle"
    shutil.copytree(TASK, bundle)
    weights = load_file(bundle / "model.safetensors")
    weights["fc1.weight"] = weights["fc1.weight"][:, :10].copy()
    save_file(weights, bundle / "model.safetensors")
    with pytest.raises(ValueError, match=r"fc1\.weight"):
        task.run(_ctx(bundle, data, {}))
    with pytest.raises(ValueError, match="out of range"):
        task.run(_ctx(TASK, data, {"lr": 0}))
    with pytest.raises(ValueError, match="modelFile must be a file of the bundle"):
        task.run(_ctx(TASK, data, {"federated": {"round": 1, "modelFile": "../x.safetensors"}}))


async def test_the_task_runs_in_the_agents_worker(tmp_path, split) -> None:
    shard = split.shards[7]
    out = await runtime.run_task(
        bundle_dir=TASK,
        bundle=bundle_files.build_manifest(TASK),
        data_dir=_data_dir(tmp_path, shard),
        state=None,
        limits=runtime.TaskLimits(timeout_s=120, memory_mb=1024),
        work_dir=tmp_path,
        inputs={"payload": {"federated": {"task": "default/digits-fl", "round": 1, "modelFile": MODEL}}},
    )
    assert out.result.sample_count == len(shard.y)
    assert out.result.metrics["loss"] < out.result.metrics["eval_loss"]
    assert sorted(out.result.tensors) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]


def test_the_manifest_is_a_valid_federated_mltask() -> None:
    doc = yaml.safe_load((EXAMPLE / "mltask.yaml").read_text(encoding="utf-8"))
    doc["spec"]["bundle"]["digest"] = "sha256:" + "0" * 64  # the placeholder `tether bundle build` fills in
    spec = validate.validate(doc["spec"])
    assert spec.federated is not None
    rules = spec.federated.parsed()
    assert rules.rounds == 30 and rules.participants.count == 10 and isinstance(rules.strategy, strategies.FedAvg)
    assert rules.evaluation is not None and (TASK / str(rules.evaluation.server_file)).is_file()


def test_the_committed_weights_and_heldout_set_are_what_build_writes(split) -> None:
    fltrain = sys.modules.get("fltrain")
    check = subprocess.run(
        [sys.executable, str(EXAMPLE / "build.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 0, check.stderr
    heldout = np.load(TASK / "cloud" / "heldout.npz")
    assert np.array_equal(heldout["y"], split.y_test) and np.array_equal(heldout["X"], split.X_test)
    weights = load_file(TASK / "model.safetensors")
    assert {k: v.shape for k, v in weights.items()} == {
        "fc1.weight": (32, 64),
        "fc1.bias": (32,),
        "fc2.weight": (10, 32),
        "fc2.bias": (10,),
    }
    assert fltrain is None or all(np.array_equal(weights[k], v) for k, v in fltrain.initial_weights(0).items())


def test_the_cloud_graph_is_fltrains_forward_pass_with_any_rounds_weights(split) -> None:
    """cloud/model.onnx (built by build.py with the onnx helper API) with a round's weights put in place of its
    initializers gives the probabilities of fltrain's MNN module and of its numpy `predict`, and the worker's
    evaluation scores it as `fltrain.evaluate` does."""
    import MNN

    from tether.controller import round_evaluation

    sys.path.insert(0, str(TASK))
    try:
        import fltrain
    finally:
        sys.path.remove(str(TASK))
    rng = np.random.default_rng(3)
    weights = {n: rng.standard_normal(s).astype(np.float32) * np.float32(0.3) for n, s in fltrain.SHAPES.items()}
    graph = (TASK / "cloud" / "model.onnx").read_bytes()
    import onnxruntime

    session = onnxruntime.InferenceSession(
        round_evaluation.with_weights(graph, weights, path="cloud/model.onnx"), providers=["CPUExecutionProvider"]
    )
    X = np.ascontiguousarray(split.X_test, dtype=np.float32)
    (onnx_probs,) = session.run(None, {"X": X})
    np.testing.assert_allclose(onnx_probs, fltrain.predict(weights, X), rtol=1e-4, atol=1e-6)
    F = MNN.expr
    F.lazy_eval(True)
    module = fltrain._module(MNN)
    for n, p in zip(fltrain._bind(module), module.parameters, strict=True):
        p.write(np.ascontiguousarray(weights[n].reshape(tuple(p.shape))))
    module.train(False)
    out = module.forward(F.const(X, list(X.shape), F.NCHW, F.float))
    mnn_probs = np.array(out.read(), dtype=np.float32, copy=True).reshape(onnx_probs.shape)
    np.testing.assert_allclose(onnx_probs, mnn_probs, rtol=1e-4, atol=1e-5)
    heldout = (TASK / "cloud" / "heldout.npz").read_bytes()
    scored = round_evaluation.evaluate(
        graph=graph, heldout=heldout, weights=weights, model_path="cloud/model.onnx", heldout_path="cloud/heldout.npz"
    )
    expected = fltrain.evaluate(weights, split.X_test, split.y_test)
    assert scored["accuracy"] == pytest.approx(expected["accuracy"])
    assert scored["loss"] == pytest.approx(expected["loss"], rel=1e-4)
