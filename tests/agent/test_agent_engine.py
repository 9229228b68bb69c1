"""MNN and ONNX Runtime engines compute what the trained weights compute."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tether.agent import engine
from tether.common import errors


def numpy_forward(onnx_path: pathlib.Path, X: np.ndarray) -> np.ndarray:
    """The digits MLP computed from the ONNX file's own weights (Gemm/Relu/Gemm/Softmax)."""
    w = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(onnx_path)).graph.initializer}
    h = np.maximum(X.astype(np.float64) @ w["W1"] + w["b1"], 0.0)
    z = h @ w["W2"] + w["b2"]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def mnn_model(digits_dir: pathlib.Path) -> engine.MNNModel:
    return engine.MNNEngine().load(str(digits_dir / "model.mnn"))


def test_mnn_matches_onnxruntime_and_numpy(mnn_model, digits_dir, digits_data) -> None:
    X = digits_data["X"]
    ours = mnn_model.run({"input": X})["probs"]
    ort = engine.OnnxRuntimeEngine().load(str(digits_dir / "model.onnx")).run({"input": X})["probs"]
    ref = numpy_forward(digits_dir / "model.onnx", X)
    assert ours.shape == ort.shape == (len(X), 10)
    np.testing.assert_allclose(ours, ort, atol=1e-4)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    np.testing.assert_allclose(ours.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 7, 64, 1, 200])
def test_mnn_resizes_batch(mnn_model, digits_dir, digits_data, batch: int) -> None:
    X = digits_data["X"][:batch]
    out = mnn_model.run({"input": X})["probs"]
    assert out.shape == (batch, 10)
    np.testing.assert_allclose(out, numpy_forward(digits_dir / "model.onnx", X), atol=1e-4)


def test_model_metadata_and_real_backend(mnn_model) -> None:
    assert mnn_model.input_names == ["input"]
    assert mnn_model.output_names == ["probs"]
    assert mnn_model.backend == "mnn/cpu"


def test_requested_gpu_backend_reports_what_really_runs(digits_dir, digits_data) -> None:
    # The pip wheel has no OpenCL: MNN silently falls back, and the model says so.
    model = engine.MNNEngine().load(str(digits_dir / "model.mnn"), backend="opencl", threads=2)
    assert model.backend == "mnn/cpu"
    assert model.run({"input": digits_data["X"][:3]})["probs"].shape == (3, 10)


def test_float64_input_is_accepted(mnn_model, digits_data) -> None:
    X = digits_data["X"][:4]
    np.testing.assert_allclose(
        mnn_model.run({"input": X.astype(np.float64)})["probs"], mnn_model.run({"input": X})["probs"]
    )


def test_wrong_input_names_are_rejected(mnn_model) -> None:
    with pytest.raises(errors.InvalidArgument, match="missing"):
        mnn_model.run({"pixels": np.zeros((1, 64), np.float32)})


def test_unknown_engine_and_backend() -> None:
    with pytest.raises(errors.InvalidArgument):
        engine.get_engine("tensorrt")
    with pytest.raises(errors.InvalidArgument):
        engine.MNNEngine().load("x.mnn", backend="tpu")


def test_detect_backends_reports_cpu() -> None:
    found = engine.detect_backends()
    assert "mnn/cpu" in found
    assert "onnxruntime/cpu" in found
    assert "mnn/opencl" not in found  # asked-for-but-fell-back is not a backend
