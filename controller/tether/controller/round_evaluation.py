"""Server-side evaluation of a federated round: the round's global model scored on the task's held-out set.

The task ships, in its bundle, for the cloud (`spec.federated.evaluation.server`):

- `file`: an .npz (no pickle) with `X`, the inputs (one row per sample, in the graph input's dtype or castable
  to it), and `y`, integer class labels;
- `model`: an ONNX graph of the model (one input, class scores out as its first output). Its initializers named
  as the global model's tensors (`model.safetensors`' names, e.g. `fc1.weight`) are replaced by the round's
  weights (same shape; cast to the initializer's dtype); initializers with other names (constants, shapes) stay.

`evaluate` builds the graph with the round's weights (the `onnx` library), runs the held-out inputs through ONNX
Runtime on the CPU and scores the output (`tether.controller.fl.scoring`: `accuracy`, and `loss` when the output
is probabilities). Every way it can fail is `scoring.EvaluationError` naming the file, tensor or array; the
worker records it with the round (`evaluationError`), which is still published: the model is good, only its score
is missing.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime
from onnx import numpy_helper

from tether.controller.fl import scoring

FIELD = "federated.evaluation.server"


def load_heldout(data: bytes, *, path: str) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """X and y of the held-out .npz (pickled arrays refused)."""
    where = f"{FIELD}.file {path!r}"
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            missing = sorted({"X", "y"} - set(npz.files))
            if missing:
                raise scoring.EvaluationError(f"{where}: has no array {missing[0]!r} (it holds {sorted(npz.files)})")
            X, y = npz["X"], npz["y"]
    except scoring.EvaluationError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise scoring.EvaluationError(f"{where}: not a readable .npz of X and y: {e}") from None
    scoring.check_heldout(X, y, where=where)
    return X, y


def with_weights(graph: bytes, weights: Mapping[str, npt.NDArray[Any]], *, path: str) -> bytes:
    """The graph with each weight put in place of the initializer of its name (shapes must match)."""
    where = f"{FIELD}.model {path!r}"
    try:
        model = onnx.load_from_string(graph)
    except Exception as e:  # protobuf's DecodeError and others
        raise scoring.EvaluationError(f"{where}: not an ONNX model: {e}") from None
    inits = {t.name: t for t in model.graph.initializer}
    for name in sorted(weights):
        init = inits.get(name)
        if init is None:
            raise scoring.EvaluationError(f"{where}: has no initializer named {name!r} (the model's tensor)")
        value = weights[name]
        if tuple(init.dims) != tuple(value.shape):
            raise scoring.EvaluationError(
                f"{where}: initializer {name!r} has shape {list(init.dims)}, the model's tensor {list(value.shape)}"
            )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value, dtype=dtype), name=name))
    return bytes(model.SerializeToString())


def evaluate(
    *, graph: bytes, heldout: bytes, weights: Mapping[str, npt.NDArray[Any]], model_path: str, heldout_path: str
) -> dict[str, float]:
    """The round's metrics on the held-out set (`accuracy`, and `loss` where the output is probabilities)."""
    X, y = load_heldout(heldout, path=heldout_path)
    built = with_weights(graph, weights, path=model_path)
    where = f"{FIELD}.model {model_path!r}"
    try:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        session = onnxruntime.InferenceSession(built, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail / InvalidGraph
        raise scoring.EvaluationError(f"{where}: ONNX Runtime cannot load it: {e}") from None
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise scoring.EvaluationError(f"{where}: must have one input (the held-out X), has {[i.name for i in inputs]}")
    feed_type = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64}.get(
        inputs[0].type
    )
    if feed_type is None:
        raise scoring.EvaluationError(f"{where}: input {inputs[0].name!r} is {inputs[0].type}, not a float tensor")
    try:
        (scores, *_) = session.run(None, {inputs[0].name: np.asarray(X, dtype=feed_type)})
    except Exception as e:  # shape or type mismatches of X against the graph's input
        raise scoring.EvaluationError(f"{where}: running the held-out X (shape {list(X.shape)}) failed: {e}") from None
    return scoring.score(np.asarray(scores), y, where=f"{where} on {heldout_path!r}")
