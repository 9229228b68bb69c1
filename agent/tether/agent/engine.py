"""Tensor engines behind one small interface: MNN first, ONNX Runtime second.

An `Engine` loads a model file for a backend and gives back a `Model` whose
`run({input name: ndarray}) -> {output name: ndarray}` is what a task's
`ctx.model.run` calls. Engines are imported lazily: a device without
onnxruntime can still run MNN bundles, and the daemon itself never loads a
model (tasks run in a worker process).

MNN's pip wheel is CPU-only and silently falls back to CPU when asked for
another backend, so the backend a model *really* runs on is read back from the
session (`getSessionInfo(BACKENDS)`) rather than trusted from the request.
`Model.backend` says what runs, e.g. "mnn/cpu".

MNN's Interpreter/Session API (used here) releases the GIL during inference;
`MNN.nn` module forward does not.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from tether.common import errors

# MNNForwardType values (MNN/MNNForwardType.h) -> backend names.
_MNN_FORWARD_TYPES = {
    0: "cpu",
    1: "metal",
    2: "cuda",
    3: "opencl",
    5: "nn",
    6: "opengl",
    7: "vulkan",
    13: "cpu",  # MNN_FORWARD_CPU_EXTENSION: the CPU backend with SIMD extensions (AVX2/ARM82)
}
_MNN_BACKEND_REQUEST = {
    "cpu": "CPU",
    "metal": "METAL",
    "cuda": "CUDA",
    "opencl": "OPENCL",
    "opengl": "OPENGL",
    "vulkan": "VULKAN",
    "nn": "NN",
}
_MNN_SESSION_INFO_BACKENDS = 2
_MNN_SESSION_INFO_RESIZE_STATUS = 3  # 0: ready
_MNN_PRECISIONS = frozenset({"normal", "high", "low", "lowBF"})
_ORT_PROVIDERS = {
    "CPUExecutionProvider": "cpu",
    "CUDAExecutionProvider": "cuda",
    "CoreMLExecutionProvider": "coreml",
    "NnapiExecutionProvider": "nnapi",
    "OpenVINOExecutionProvider": "openvino",
    "DmlExecutionProvider": "directml",
}
_ORT_PROVIDER_FOR = {v: k for k, v in _ORT_PROVIDERS.items()}
# MNN halide types for the dtypes a model input may take.
_NUMPY_TO_HALIDE = {np.dtype(np.float32): "Halide_Type_Float", np.dtype(np.int32): "Halide_Type_Int"}


class Model(Protocol):
    """A loaded model. Not safe for concurrent `run` calls from several threads unless stated."""

    @property
    def input_names(self) -> list[str]: ...

    @property
    def output_names(self) -> list[str]: ...

    @property
    def backend(self) -> str:
        """What really runs, "<engine>/<backend>", e.g. "mnn/cpu"."""
        ...

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Engine(Protocol):
    name: str

    def load(self, model_path: str, *, backend: str = "cpu", threads: int = 1) -> Model: ...


# ---------------------------------------------------------------- MNN


class MNNModel:
    """An MNN Interpreter + Session. Input shapes follow the arrays passed to `run`."""

    def __init__(self, interpreter: Any, session: Any, backend: str, mnn: Any) -> None:
        self._mnn = mnn
        self._interp = interpreter
        self._session = session
        self._backend = backend
        self._lock = threading.Lock()
        self._inputs = interpreter.getSessionInputAll(session)
        self._input_names = list(self._inputs)
        self._output_names = list(interpreter.getSessionOutputAll(session))
        self._shapes: dict[str, tuple[int, ...]] = {n: tuple(t.getShape()) for n, t in self._inputs.items()}
        self._in_meta: dict[str, tuple[Any, Any, Any, Any]] = {}  # input name -> see _input_meta
        self._outputs: list[tuple[str, Any, Any]] = []  # (name, session tensor, host tensor); [] after a resize

    @property
    def input_names(self) -> list[str]:
        return list(self._input_names)

    @property
    def output_names(self) -> list[str]:
        return list(self._output_names)

    @property
    def backend(self) -> str:
        return self._backend

    def resize(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Resize inputs (e.g. to a manifest's declared shapes) before the first run."""
        with self._lock:
            self._resize_locked({k: tuple(int(d) for d in v) for k, v in shapes.items()})

    def _resize_locked(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        changed = False
        for name, shape in shapes.items():
            if name not in self._inputs:
                raise errors.InvalidArgument(f"model has no input {name!r}; inputs: {self._input_names}")
            if self._shapes.get(name) != shape:
                self._interp.resizeTensor(self._inputs[name], shape)
                self._shapes[name] = shape
                changed = True
        if changed:
            self._outputs = []
            self._interp.resizeSession(self._session)
            if float(self._interp.getSessionInfo(self._session, _MNN_SESSION_INFO_RESIZE_STATUS)) != 0.0:
                self._shapes.clear()  # the session is unusable until a resize succeeds
                raise errors.InvalidArgument(
                    f"model does not accept input shapes {dict(shapes)} (MNN could not resize the session)"
                )

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # On every inference: per-input types and per-output host tensors are prepared once per shape
        # (`_outputs` is dropped on resize), so a call costs about what calling MNN directly does.
        arrays = _check_inputs(inputs, self._input_names)
        with self._lock:
            shapes = self._shapes
            for name, a in arrays.items():
                if shapes.get(name) != a.shape:
                    self._resize_locked({n: tuple(x.shape) for n, x in arrays.items()})
                    break
            mnn = self._mnn
            for name, a in arrays.items():
                meta = self._in_meta.get(name)
                if meta is None or meta[0] != a.dtype:
                    meta = self._input_meta(name, a.dtype)
                if meta[1] is None:
                    a = a.astype(np.float32)
                    meta = self._input_meta(name, a.dtype)
                meta[3].copyFrom(mnn.Tensor(a.shape, meta[1], a, meta[2]))
            code = self._interp.runSession(self._session)
            if code != 0:
                raise errors.TaskFailed(f"MNN runSession failed with error code {code}")
            outs = self._outputs or self._prepare_outputs()
            outputs = {}
            for name, out, host in outs:
                out.copyToHostTensor(host)
                # The host tensor is reused: hand out a copy of its data.
                outputs[name] = np.array(host.getNumpyData(), copy=True)
            return outputs

    def _input_meta(self, name: str, dtype: np.dtype[Any]) -> tuple[Any, Any, Any, Any]:
        """(dtype, MNN halide type or None when unsupported, host dimension type, session tensor)."""
        halide = _NUMPY_TO_HALIDE.get(dtype)
        tensor = self._inputs[name]
        meta = (
            dtype,
            None if halide is None else getattr(self._mnn, halide),
            _host_dim_type(self._mnn, tensor),
            tensor,
        )
        self._in_meta[name] = meta
        return meta

    def _prepare_outputs(self) -> list[tuple[str, Any, Any]]:
        """Each output's session tensor and a host tensor of its current shape."""
        mnn = self._mnn
        prepared = []
        for name in self._output_names:
            out = self._interp.getSessionOutput(self._session, name)
            shape = tuple(out.getShape())
            host = mnn.Tensor(shape, mnn.Halide_Type_Float, np.zeros(shape, np.float32), _host_dim_type(mnn, out))
            prepared.append((name, out, host))
        self._outputs = prepared
        return prepared


def _host_dim_type(mnn: Any, tensor: Any) -> Any:
    """Host copies use the device tensor's layout, except NC4HW4 which is internal: use NCHW."""
    dim = tensor.getDimensionType()
    return mnn.Tensor_DimensionType_Caffe if dim == mnn.Tensor_DimensionType_Caffe_C4 else dim


class MNNEngine:
    name = "mnn"

    def __init__(self, *, precision: str = "high") -> None:
        if precision not in _MNN_PRECISIONS:
            raise errors.InvalidArgument(f"precision: {precision!r} not in {sorted(_MNN_PRECISIONS)}")
        self.precision = precision

    def load(self, model_path: str, *, backend: str = "cpu", threads: int = 1) -> MNNModel:
        import MNN

        if backend not in _MNN_BACKEND_REQUEST:
            raise errors.InvalidArgument(f"MNN backend {backend!r} not in {sorted(_MNN_BACKEND_REQUEST)}")
        try:
            interp = MNN.Interpreter(str(model_path))
        except Exception as e:  # MNN raises a bare Exception for a missing or corrupt file
            raise errors.InvalidArgument(f"MNN cannot load model {pathlib.Path(model_path).name}: {e}") from None
        # Release mode: no per-op callbacks needed; frees the model buffer after session creation.
        session = interp.createSession(
            {"backend": _MNN_BACKEND_REQUEST[backend], "numThread": max(1, int(threads)), "precision": self.precision}
        )
        if session is None:
            raise errors.TaskFailed(f"MNN could not create a session for {model_path}")
        forward_type = int(interp.getSessionInfo(session, _MNN_SESSION_INFO_BACKENDS))
        real = _MNN_FORWARD_TYPES.get(forward_type, f"type{forward_type}")
        return MNNModel(interp, session, f"mnn/{real}", MNN)


# ---------------------------------------------------------------- ONNX Runtime


class OnnxRuntimeModel:
    def __init__(self, session: Any, backend: str) -> None:
        self._session = session
        self._backend = backend
        self._input_names = [i.name for i in session.get_inputs()]
        self._output_names = [o.name for o in session.get_outputs()]

    @property
    def input_names(self) -> list[str]:
        return list(self._input_names)

    @property
    def output_names(self) -> list[str]:
        return list(self._output_names)

    @property
    def backend(self) -> str:
        return self._backend

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = _check_inputs(inputs, self._input_names)
        values = self._session.run(self._output_names, arrays)
        return {name: np.asarray(v) for name, v in zip(self._output_names, values, strict=True)}


class OnnxRuntimeEngine:
    name = "onnxruntime"

    def load(self, model_path: str, *, backend: str = "cpu", threads: int = 1) -> OnnxRuntimeModel:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise errors.FailedPrecondition("onnxruntime is not installed on this device") from e
        provider = _ORT_PROVIDER_FOR.get(backend)
        if provider is None:
            raise errors.InvalidArgument(f"onnxruntime backend {backend!r} not in {sorted(_ORT_PROVIDER_FOR)}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(threads))
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        available = ort.get_available_providers()
        providers = [provider] if provider in available else []
        if "CPUExecutionProvider" not in providers:
            providers.append("CPUExecutionProvider")
        try:
            session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
        except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise errors.InvalidArgument(
                f"onnxruntime cannot load model {pathlib.Path(model_path).name}: {first}"
            ) from None
        real = _ORT_PROVIDERS.get(session.get_providers()[0], session.get_providers()[0])
        return OnnxRuntimeModel(session, f"onnxruntime/{real}")


# ---------------------------------------------------------------- selection and probing

ENGINES: dict[str, type[MNNEngine] | type[OnnxRuntimeEngine]] = {"mnn": MNNEngine, "onnxruntime": OnnxRuntimeEngine}


def get_engine(name: str) -> Engine:
    try:
        return ENGINES[name]()
    except KeyError:
        raise errors.InvalidArgument(f"unknown engine {name!r}; known: {sorted(ENGINES)}") from None


def _check_inputs(inputs: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """The inputs as contiguous arrays (float64 as float32), by model input name.

    The common case (a dict of the right names holding contiguous non-float64
    arrays) is checked in a few hundred nanoseconds: it is on every inference.
    """
    if type(inputs) is dict and len(inputs) == len(names):
        out = {}
        for name in names:
            a = inputs.get(name)
            if type(a) is not np.ndarray or a.dtype.char == "d" or not a.flags.c_contiguous:
                break
            out[name] = a
        else:
            return out
    if not isinstance(inputs, Mapping):
        raise errors.InvalidArgument("model inputs must be a mapping of input name to array")
    if len(inputs) != len(names) or any(n not in inputs for n in names):
        unknown = set(inputs) - set(names)
        missing = set(names) - set(inputs)
        raise errors.InvalidArgument(
            f"model inputs: expected {names}, got {sorted(inputs)}"
            + (f" (missing {sorted(missing)})" if missing else "")
            + (f" (unknown {sorted(unknown)})" if unknown else "")
        )
    out = {}
    for name in names:
        a = np.asarray(inputs[name])
        if a.dtype == np.float64:
            a = a.astype(np.float32)
        out[name] = np.ascontiguousarray(a)
    return out


def _probe_in_process() -> list[str]:
    """What really runs here: MNN backends read back from real sessions on a tiny model; ORT providers."""
    found: list[str] = []
    try:
        import MNN

        F = MNN.expr
        with tempfile.TemporaryDirectory() as tmp:
            x = F.placeholder([1, 4], F.NCHW)
            x.name = "x"
            y = F.relu(x)
            y.name = "y"
            path = f"{tmp}/probe.mnn"
            F.save([y], path)
            interp = MNN.Interpreter(path)
            for name, request in _MNN_BACKEND_REQUEST.items():
                session = interp.createSession({"backend": request, "numThread": 1})
                real = _MNN_FORWARD_TYPES.get(int(interp.getSessionInfo(session, _MNN_SESSION_INFO_BACKENDS)))
                if real == name:  # asked for X and really got X: not a silent fallback
                    found.append(f"mnn/{real}")
    except Exception:  # a broken engine simply is not a backend of this device
        pass
    try:
        import onnxruntime as ort

        for provider in ort.get_available_providers():
            if provider in _ORT_PROVIDERS:
                found.append(f"onnxruntime/{_ORT_PROVIDERS[provider]}")
    except Exception:
        pass
    return list(dict.fromkeys(found))


def detect_backends(*, timeout_s: float = 60.0) -> list[str]:
    """Probe engine backends in a child process (native libraries print, spawn threads, may crash on
    broken GPU drivers: none of that should reach the daemon). Returns e.g. ["mnn/cpu", "onnxruntime/cpu"]."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", "import json, tether.agent.engine as e; print(json.dumps(e._probe_in_process()))"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("["):
            try:
                backends = json.loads(line)
            except json.JSONDecodeError:
                continue
            return [b for b in backends if isinstance(b, str)]
    return []
