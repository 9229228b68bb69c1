"""Build the `digits-eval` example bundle (build-time only; not imported by the agent).

Trains a small MLP (64 -> 32 -> 10) on scikit-learn's 8x8 digits with a fixed
seed, exports it to ONNX with plain `onnx.helper` nodes (Gemm/Relu/Gemm/Softmax,
input "input" [N, 64] float32 with a dynamic batch, output "probs"), converts it
to MNN with the converter's `_tools.mnnconvert` entry point, and writes:

- task/model.onnx, task/model.mnn, task/bundle.yaml (task/task.py is hand-written)
- device_data.npz: the held-out split (X float32 in [0, 1], y int64) that
  simulated devices shard between them.

Deterministic: the same inputs give byte-identical artifacts. The MNN converter
stamps a random UUID into every model it writes; it is replaced by a UUID
derived from the ONNX bytes so a rebuild does not change the bundle's digest.

Usage: python examples/digits/build.py [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import pathlib
import sys
import tempfile
import uuid
import zipfile

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

SEED = 0
HIDDEN = 32
HERE = pathlib.Path(__file__).resolve().parent
# MNN never imports `MNN.tools` (it installs packages and phones home at import);
# the converter's C entry point is used directly.
CONVERT_ARGS = ("mnnconvert", "-f", "ONNX", "--modelFile", "{onnx}", "--MNNModel", "{mnn}", "--bizCode", "tether")


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)  # pixel values 0..16 -> [0, 1]
    y = digits.target.astype(np.int64)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, random_state=SEED, stratify=y)
    return X_train, X_test, y_train, y_test


def train(X: np.ndarray, y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Return [(W1 [64,32], b1 [32]), (W2 [32,10], b2 [10])] as float32."""
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(
        hidden_layer_sizes=(HIDDEN,),
        activation="relu",
        solver="adam",
        alpha=1e-4,
        max_iter=400,
        random_state=SEED,
        tol=1e-6,
        n_iter_no_change=30,
    )
    with contextlib.redirect_stderr(io.StringIO()):  # ConvergenceWarning noise
        clf.fit(X, y)
    layers = []
    for w, b in zip(clf.coefs_, clf.intercepts_, strict=True):
        w, b = w.astype(np.float32), b.astype(np.float32)
        # Flush float32 denormals to zero: engines treat them differently (MNN warns about them).
        tiny = np.finfo(np.float32).tiny
        w[np.abs(w) < tiny] = 0.0
        b[np.abs(b) < tiny] = 0.0
        layers.append((w, b))
    return layers


def forward(layers: list[tuple[np.ndarray, np.ndarray]], X: np.ndarray) -> np.ndarray:
    """Reference forward pass in numpy (softmax probabilities)."""
    (W1, b1), (W2, b2) = layers
    h = np.maximum(X @ W1 + b1, 0.0)
    z = h @ W2 + b2
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def to_onnx(layers: list[tuple[np.ndarray, np.ndarray]]) -> onnx.ModelProto:
    (W1, b1), (W2, b2) = layers
    initializers = [
        numpy_helper.from_array(W1, "W1"),
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(W2, "W2"),
        numpy_helper.from_array(b2, "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["input", "W1", "b1"], ["hidden"], name="fc1"),
        helper.make_node("Relu", ["hidden"], ["hidden_relu"], name="relu1"),
        helper.make_node("Gemm", ["hidden_relu", "W2", "b2"], ["logits"], name="fc2"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", W1.shape[0]])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", W2.shape[1]])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tether-examples")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def convert_to_mnn(onnx_path: pathlib.Path, mnn_path: pathlib.Path) -> None:
    import _tools  # the MNN converter's C extension, shipped with the `mnn` wheel

    args = [a.format(onnx=onnx_path, mnn=mnn_path) for a in CONVERT_ARGS]
    mnn_path.unlink(missing_ok=True)
    ok = _tools.mnnconvert(args)
    # The converter answers True even when it failed (e.g. a missing input file): check the output.
    if not ok or not mnn_path.is_file() or mnn_path.stat().st_size == 0:
        raise SystemExit(f"MNN conversion failed: {' '.join(args)}")
    _pin_uuid(mnn_path, seed=onnx_path.read_bytes())


def _pin_uuid(mnn_path: pathlib.Path, *, seed: bytes) -> None:
    """Replace the converter's random model UUID by one derived from `seed` (same length)."""
    import MNN

    old = MNN.get_model_uuid(str(mnn_path)).encode("ascii")
    new = str(uuid.UUID(bytes=hashlib.sha256(seed).digest()[:16], version=4)).encode("ascii")
    data = mnn_path.read_bytes()
    if len(old) != len(new) or data.count(old) != 1:
        raise SystemExit(f"cannot pin the MNN model uuid in {mnn_path} (found {data.count(old)} copies)")
    mnn_path.write_bytes(data.replace(old, new))
    if MNN.get_model_uuid(str(mnn_path)).encode("ascii") != new:
        raise SystemExit("pinning the MNN model uuid failed")


def mnn_forward(mnn_path: pathlib.Path, X: np.ndarray) -> np.ndarray:
    import MNN

    interp = MNN.Interpreter(str(mnn_path))
    session = interp.createSession({"backend": "CPU", "numThread": 1, "precision": "high"})
    inp = interp.getSessionInput(session)
    interp.resizeTensor(inp, tuple(X.shape))
    interp.resizeSession(session)
    inp.copyFrom(MNN.Tensor(tuple(X.shape), MNN.Halide_Type_Float, X, MNN.Tensor_DimensionType_Caffe))
    interp.runSession(session)
    out = interp.getSessionOutput(session, "probs")
    host = MNN.Tensor(out.getShape(), MNN.Halide_Type_Float, np.zeros(out.getShape(), np.float32), 1)
    out.copyToHostTensor(host)
    return np.array(host.getNumpyData(), copy=True)


def write_npz(path: pathlib.Path, **arrays: np.ndarray) -> None:
    """Like np.savez_compressed, with fixed zip timestamps so the bytes are reproducible."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(
                zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)),
                buf.getvalue(),
                compress_type=zipfile.ZIP_DEFLATED,
            )


def build(out: pathlib.Path) -> dict[str, float]:
    task_dir = out / "task"
    task_dir.mkdir(parents=True, exist_ok=True)
    X_train, X_test, y_train, y_test = load_split()
    layers = train(X_train, y_train)
    ref = forward(layers, X_test)

    model = to_onnx(layers)
    onnx_path = task_dir / "model.onnx"
    onnx_path.write_bytes(model.SerializeToString())
    with tempfile.TemporaryDirectory() as tmp:
        tmp_mnn = pathlib.Path(tmp) / "model.mnn"
        convert_to_mnn(onnx_path, tmp_mnn)
        (task_dir / "model.mnn").write_bytes(tmp_mnn.read_bytes())

    # The converted models must compute what the trained weights compute.
    import onnxruntime as ort

    ort_probs = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"input": X_test})[0]
    mnn_probs = mnn_forward(task_dir / "model.mnn", X_test)
    if not (np.allclose(ort_probs, ref, atol=1e-5) and np.allclose(mnn_probs, ref, atol=1e-4)):
        raise SystemExit("converted models disagree with the numpy reference")

    spec = {
        "name": "digits-eval",
        "entrypoint": "task.py",
        "engines": [{"engine": "mnn", "model": "model.mnn", "inputs": {"input": [1, int(X_test.shape[1])]}}],
    }
    (task_dir / "bundle.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    write_npz(out / "device_data.npz", X=X_test, y=y_test)
    return {
        "train_accuracy": float((forward(layers, X_train).argmax(1) == y_train).mean()),
        "test_accuracy": float((ref.argmax(1) == y_test).mean()),
        "test_samples": len(y_test),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=HERE, help="output directory (default: this folder)")
    args = parser.parse_args(argv)
    stats = build(args.out)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()), file=sys.stderr)


if __name__ == "__main__":
    main()
