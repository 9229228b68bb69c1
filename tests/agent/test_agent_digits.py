"""The digits example end to end through the runtime, on real MNN, checked independently with numpy."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from tether.agent import runtime
from tether.common import bundle_files


def test_bundle_spec_and_manifest(digits_dir) -> None:
    name, entrypoint, engines = bundle_files.load_bundle_spec(digits_dir)
    assert (name, entrypoint) == ("digits-eval", "task.py")
    assert [(e.engine, e.model, dict(e.inputs)) for e in engines] == [("mnn", "model.mnn", {"input": (1, 64)})]
    m = bundle_files.build_manifest(digits_dir)
    assert {f.path for f in m.files} == {"bundle.yaml", "model.mnn", "model.onnx", "task.py"}
    assert bundle_files.build_manifest(digits_dir).digest == m.digest  # deterministic


async def test_digits_task_on_mnn(tmp_path, digits_dir, data_dir, digits_data) -> None:
    out = await runtime.run_task(
        bundle_dir=digits_dir,
        bundle=bundle_files.build_manifest(digits_dir),
        data_dir=data_dir,
        state={},
        limits=runtime.TaskLimits(timeout_s=60, memory_mb=512),
        work_dir=tmp_path,
    )
    # Independent check: the ONNX file's weights through numpy on the same 150 samples.
    X, y = digits_data["X"][:150].astype(np.float64), digits_data["y"][:150]
    w = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(digits_dir / "model.onnx")).graph.initializer}
    z = np.maximum(X @ w["W1"] + w["b1"], 0) @ w["W2"] + w["b2"]
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    pred = probs.argmax(1)
    expected_acc = float((pred == y).mean())

    r = out.result
    assert out.backend == "mnn/cpu"
    assert r.sample_count == 150
    assert r.counts == {"samples": 150, "correct": int((pred == y).sum())}
    assert abs(r.metrics["accuracy"] - expected_acc) < 1e-12
    assert expected_acc > 0.9
    np.testing.assert_allclose(r.tensors["mean_probs"], probs.mean(0), atol=1e-5)
    confusion = np.zeros((10, 10))
    np.add.at(confusion, (y, pred), 1)
    np.testing.assert_array_equal(r.tensors["confusion"], confusion)
    assert out.state == {"runs": 1}
