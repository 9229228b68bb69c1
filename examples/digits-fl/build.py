"""Build the `digits-fl` example bundle's data files (build-time only; not imported by the agent).

Writes, deterministically (the same inputs give byte-identical files):

- task/model.safetensors: the round-0 global model (`spec.federated.modelFile`'s default), `fltrain.initial_weights(0)`
  (Glorot-uniform, seed 0), float32, named `fc1.weight` ... `fc2.bias`;
- task/cloud/heldout.npz: the stratified 20 % held-out test set (X float32,
  y int64) that the cloud scores every round's global model on
  (`spec.federated.evaluation.server.file`);
- task/cloud/model.onnx: the model's forward pass as an ONNX graph, built with
  the `onnx` helper API (no torch): input `X` [n, 64] float32 ->
  Gemm(fc1.weight, fc1.bias, transB) -> Relu -> Gemm(fc2.weight, fc2.bias,
  transB) -> Softmax -> `probabilities` [n, 10]; its initializers are named
  as the safetensors tensors, so the cloud puts each round's weights in
  their place (`spec.federated.evaluation.server.model`). Opset 17, IR 8.

The devices' data is the Dirichlet(0.5) split of the other 80 %
(`tether.devtools.fldata.digits_split()`), computed where it is needed
(simulated fleets, `tether bench fl`) rather than shipped.

Usage: python examples/digits-fl/build.py [--check]
"""

from __future__ import annotations

import argparse
import io
import pathlib
import sys
import zipfile

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
TASK = HERE / "task"
sys.path.insert(0, str(TASK))

import fltrain  # noqa: E402  (the bundle's own module)


def artifacts() -> dict[str, bytes]:
    from safetensors.numpy import save

    from tether.devtools import fldata

    split = fldata.digits_split()
    buf = io.BytesIO()
    write_npz_to(buf, X=split.X_test, y=split.y_test)
    weights = fltrain.initial_weights(0)
    return {
        "model.safetensors": save(weights),
        "cloud/heldout.npz": buf.getvalue(),
        "cloud/model.onnx": onnx_graph(weights),
    }


OPSET = 17
IR_VERSION = 8


def onnx_graph(weights: dict[str, np.ndarray]) -> bytes:
    """The MLP's forward pass (softmax probabilities) with `weights` as its named initializers; same bytes for the
    same weights."""
    from onnx import TensorProto, checker, helper, numpy_helper

    nodes = [
        helper.make_node("Gemm", ["X", "fc1.weight", "fc1.bias"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu"),
        helper.make_node("Gemm", ["a1", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        inputs=[helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", fltrain.FEATURES])],
        outputs=[helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", fltrain.CLASSES])],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(weights[n]), name=n) for n in fltrain.NAMES],
    )
    model = helper.make_model(
        graph, producer_name="tether examples/digits-fl/build.py", opset_imports=[helper.make_opsetid("", OPSET)]
    )
    model.ir_version = IR_VERSION
    checker.check_model(model)
    return bytes(model.SerializeToString())


def write_npz_to(fileobj: io.BytesIO, **arrays: np.ndarray) -> None:
    with zipfile.ZipFile(fileobj, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed files differ from a rebuild")
    args = parser.parse_args()
    stale = []
    for rel, data in artifacts().items():
        path = TASK / rel
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                stale.append(rel)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            print(f"wrote {path} ({len(data)} bytes)")
    if stale:
        print(f"stale: {stale}; run python examples/digits-fl/build.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
