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

import dataclasses
import json
import pathlib
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

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
_ORT_TYPES = {f"tensor({t})": np.dtype(n) for t, n in (("float", "float32"), ("double", "float64"))} | {
    f"tensor({t})": np.dtype(t) for t in ("float16", "int64", "int32", "int16", "int8", "uint8", "bool")
}
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


class _Names:
    """`Model`'s names and backend, for the engines' models."""

    _input_names: list[str]
    _output_names: list[str]
    _backend: str

    @property
    def input_names(self) -> list[str]:
        return list(self._input_names)

    @property
    def output_names(self) -> list[str]:
        return list(self._output_names)

    @property
    def backend(self) -> str:
        return self._backend


# ---------------------------------------------------------------- MNN


class _Input(NamedTuple):
    """How one input reaches the session, for the current shapes."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any] | None  # the session tensor's element type; None: one this wrapper cannot feed
    view: np.ndarray | None  # the session's own input memory (checked), written in place; None: copyFrom
    tensor: Any  # the session tensor
    halide: Any  # for copyFrom: the session tensor's halide type
    dim: Any  # for copyFrom: the host dimension type


class _Output(NamedTuple):
    """How one output leaves the session, for the current shapes."""

    name: str
    view: np.ndarray | None  # the session's own output memory, checked to agree with copyToHostTensor
    tensor: Any  # the session tensor
    host: Any  # a host tensor of the output's shape, for copyToHostTensor
    host_view: np.ndarray  # the host tensor's memory
    candidate: np.ndarray | None  # a view of the session's memory not checked yet (after the first run)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything one inference needs for the current input shapes; made after each resize."""

    inputs: tuple[_Input, ...]
    outputs: tuple[_Output, ...]
    checked: bool = False  # the first run on it checked the output views and that no memory moved
    undecided_runs: int = 0  # runs whose outputs could not decide an output view (see _check_plan)
    # Once checked, and if every output has a view: (name, view) of each, for the fast path.
    direct_outputs: tuple[tuple[str, np.ndarray], ...] | None = None
    # Once checked, for one input and one output that both have views: (input name, shape, dtype, view,
    # output name, view).
    one: tuple[str, tuple[int, ...], np.dtype[Any] | None, np.ndarray, str, np.ndarray] | None = None


class MNNModel(_Names):
    """An MNN Interpreter + Session. Input shapes follow the arrays passed to `run`; `run` is thread-safe.

    Every inference is on the task path, so its cost matters next to small models (a few µs). After
    each resize the model makes a plan: on the CPU backend, an input tensor with a host layout (NCHW
    or NHWC, not the internal NC4HW4) exposes the session's own input memory as an array, and writing
    the caller's array into it replaces building an MNN host tensor and `copyFrom` per call; an output
    of host layout is read the same way instead of `copyToHostTensor`. Neither is assumed: an input
    view is used only if a `copyFrom` of a known pattern shows up in it exactly (same memory, layout
    and element type: a backend storing half precision would fail this), an output view only once it
    agrees with `copyToHostTensor` on a run, and after that first run the memory must still be where
    the plan found it. The views are fetched again after every resize (the session's memory may move).
    Outputs are always copies: callers never hold memory the next inference overwrites.

    A call whose inputs are a dict of exactly the input names holding arrays of the planned shapes
    and dtypes takes the fast path; anything else (float64 or other dtypes, a new shape, another
    mapping type, errors) takes the general path, which validates, converts and resizes, with the
    same results.
    """

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
        self._plan: _Plan | None = None  # None until the first run after a resize
        # Views of session memory only where host memory is what runs (the CPU backend), and until
        # memory is seen to move under a plan.
        self._zero_copy = backend == "mnn/cpu"
        self._halide_dtypes = {getattr(mnn, h): d for d, h in _NUMPY_TO_HALIDE.items()}

    @property
    def input_types(self) -> dict[str, np.dtype[Any]]:  # an ONNX int64 input is int32 in MNN; unknown: float32
        return {n: self._halide_dtypes.get(t.getDataType(), np.dtype("float32")) for n, t in self._inputs.items()}

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
            self._plan = None  # the session's memory may move: views and host tensors are made again
            self._interp.resizeSession(self._session)
            if float(self._interp.getSessionInfo(self._session, _MNN_SESSION_INFO_RESIZE_STATUS)) != 0.0:
                self._shapes.clear()  # the session is unusable until a resize succeeds
                raise errors.InvalidArgument(
                    f"model does not accept input shapes {dict(shapes)} (MNN could not resize the session)"
                )

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        lock = self._lock
        lock.acquire()  # not `with`: on every inference, and its __exit__ costs as much as acquire + release
        try:
            plan = self._plan
            if plan is not None and type(inputs) is dict and len(inputs) == len(plan.inputs):
                # The fast paths: exactly the input names, arrays of the planned shapes and dtypes. Anything
                # else goes on to the general path, which writes every input again.
                if plan.one is not None:  # the common case, unrolled: one input and one output, both views
                    name, shape, dtype, in_view, out_name, out_view = plan.one
                    a = inputs.get(name)
                    if type(a) is np.ndarray and a.dtype is dtype and a.shape == shape:
                        in_view[...] = a  # any strides: numpy copies element by element into the session
                        code = self._interp.runSession(self._session)
                        if code != 0:
                            raise _run_failed(code)
                        return {out_name: out_view.copy()}  # the next inference overwrites it: a copy
                for name, shape, dtype, view, tensor, halide, dim in plan.inputs:
                    a = inputs.get(name)
                    if type(a) is not np.ndarray or a.dtype is not dtype or a.shape != shape:
                        break
                    if view is not None:
                        view[...] = a
                    elif a.flags.c_contiguous:
                        tensor.copyFrom(self._mnn.Tensor(shape, halide, a, dim))
                    else:
                        break
                else:
                    code = self._interp.runSession(self._session)
                    if code != 0:
                        raise _run_failed(code)
                    if plan.direct_outputs is None:
                        return self._outputs(plan, inputs)
                    outputs = {}
                    for name, view in plan.direct_outputs:
                        outputs[name] = view.copy()
                    return outputs
        finally:
            lock.release()
        arrays = _check_inputs(inputs, self._input_names)
        with self._lock:
            return self._run_general(arrays)

    def _run_general(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validated arrays (float64 made float32 already): resize if needed, convert, write, run."""
        if any(self._shapes.get(name) != a.shape for name, a in arrays.items()):
            self._resize_locked({n: tuple(a.shape) for n, a in arrays.items()})
        plan = self._plan or self._make_plan()
        for name, _, dtype, view, tensor, halide, dim in plan.inputs:
            a = arrays[name]
            if dtype is None:
                raise errors.InvalidArgument(f"model input {name!r} has an element type MNN's Python API cannot fill")
            if a.dtype != dtype:
                a = _convert_input(name, a, dtype)
            if view is not None:
                view[...] = a
            else:  # contiguous already unless the fast path fell back to here
                tensor.copyFrom(self._mnn.Tensor(a.shape, halide, np.ascontiguousarray(a), dim))
        code = self._interp.runSession(self._session)
        if code != 0:
            raise _run_failed(code)
        return self._outputs(plan, arrays)

    def _outputs(self, plan: _Plan, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copies of the outputs of the run just done; the first run on a plan checks it."""
        if not plan.checked:
            checked = self._check_plan(plan)
            if checked is None:  # memory moved under the plan: never use views on this model again
                self._zero_copy = False
                self._plan = None
                return self._run_general(arrays)
            plan = self._plan = checked
        outputs = {}
        for name, view, tensor, host, host_view, _ in plan.outputs:
            if view is None:
                tensor.copyToHostTensor(host)
                view = host_view
            outputs[name] = view.copy()  # the memory is reused by the next inference: hand out a copy
        return outputs

    def _make_plan(self) -> _Plan:
        mnn, interp, session = self._mnn, self._interp, self._session
        inputs = []
        for name in self._input_names:
            tensor = interp.getSessionInput(session, name)
            shape, dim, halide = self._shapes[name], _host_dim_type(mnn, tensor), tensor.getDataType()
            dtype = self._halide_dtypes.get(halide)
            view = _input_view(mnn, tensor, shape) if self._zero_copy and dtype is not None else None
            if view is not None and view.dtype != dtype:
                view = None
            inputs.append(_Input(name, shape, dtype, view, tensor, halide, dim))
        outputs = []
        for name in self._output_names:
            tensor = interp.getSessionOutput(session, name)
            shape = tuple(tensor.getShape())
            host = mnn.Tensor(shape, mnn.Halide_Type_Float, np.zeros(shape, np.float32), _host_dim_type(mnn, tensor))
            host_view = host.getNumpyData()
            candidate = _session_view(mnn, tensor) if self._zero_copy else None
            if candidate is not None and (candidate.shape != host_view.shape or candidate.dtype != host_view.dtype):
                candidate = None
            outputs.append(_Output(name, None, tensor, host, host_view, candidate))
        self._plan = _Plan(tuple(inputs), tuple(outputs))
        return self._plan

    def _check_plan(self, plan: _Plan) -> _Plan | None:
        """After a run: None if session memory moved away from the plan's views; else the plan with each
        output view decided (used if it agrees with `copyToHostTensor`). An output with no finite non-zero
        value proves nothing (zeros read the same in any element type): decided on a later run, or after
        `_UNDECIDED_RUNS` such runs, copied with `copyToHostTensor` for good."""
        interp, session = self._interp, self._session
        for inp in plan.inputs:
            if inp.view is not None and not _same_memory(inp.view, interp.getSessionInput(session, inp.name)):
                return None
        outputs, undecided = [], False
        for out in plan.outputs:
            if out.candidate is not None:
                if not _same_memory(out.candidate, out.tensor):
                    return None
                out.tensor.copyToHostTensor(out.host)
                ref = out.host_view
                informative = bool((np.isfinite(ref) & (ref != 0)).any())
                if informative and _holds(out.candidate, ref):
                    out = out._replace(view=out.candidate, candidate=None)
                elif informative or plan.undecided_runs + 1 >= _UNDECIDED_RUNS:
                    out = out._replace(candidate=None)
                else:
                    undecided = True
            outputs.append(out)
        if undecided:
            return dataclasses.replace(plan, outputs=tuple(outputs), undecided_runs=plan.undecided_runs + 1)
        views = [(o.name, o.view) for o in outputs if o.view is not None]
        direct = tuple(views) if len(views) == len(outputs) else None
        one = None
        i = plan.inputs[0] if len(plan.inputs) == 1 else None
        if direct is not None and len(direct) == 1 and i is not None and i.view is not None:
            one = (i.name, i.shape, i.dtype, i.view, *direct[0])
        return dataclasses.replace(plan, outputs=tuple(outputs), checked=True, direct_outputs=direct, one=one)


_UNDECIDED_RUNS = 8  # runs an output may prove nothing before it is copied with copyToHostTensor for good
_HOST_LAYOUTS = ("Tensor_DimensionType_Caffe", "Tensor_DimensionType_Tensorflow")  # NCHW, NHWC; not NC4HW4


def _session_view(mnn: Any, tensor: Any) -> np.ndarray | None:
    """The session tensor's memory as a writable array, where its layout is a host one; unchecked."""
    if tensor.getDimensionType() not in tuple(getattr(mnn, d) for d in _HOST_LAYOUTS):
        return None
    try:
        view = tensor.getNumpyData()
    except Exception:  # element types numpy has no equivalent for
        return None
    if type(view) is not np.ndarray or view.size == 0 or not view.flags.c_contiguous or not view.flags.writeable:
        return None
    return view


def _input_view(mnn: Any, tensor: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """The session's input memory as an array, if writing there is exactly what `copyFrom` does."""
    view = _session_view(mnn, tensor)
    if view is None or view.shape != shape or view.dtype not in _NUMPY_TO_HALIDE:
        return None
    # A pattern of distinct, non-round values through copyFrom must appear in the view unchanged.
    pattern = ((np.arange(view.size) % 8191 + 1) * (0.3 if view.dtype.kind == "f" else 1)).astype(view.dtype)
    pattern = pattern.reshape(shape)
    halide = getattr(mnn, _NUMPY_TO_HALIDE[view.dtype])
    tensor.copyFrom(mnn.Tensor(shape, halide, pattern, _host_dim_type(mnn, tensor)))
    return view if _holds(view, pattern) else None


def _holds(view: np.ndarray, expected: np.ndarray) -> bool:
    """view == expected, comparing the first half first: if the session stores fewer bytes per element
    than the view claims (half precision), reading only that half stays inside its memory."""
    flat, ref = view.reshape(-1), expected.reshape(-1)
    half = (flat.size + 1) // 2
    return bool(np.array_equal(flat[:half], ref[:half], equal_nan=True) and np.array_equal(flat, ref, equal_nan=True))


def _convert_input(name: str, a: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """An array as the session input's element type: real numbers to float, integers in range to integers."""
    kind = a.dtype.kind
    if kind not in "biuf" or (kind == "f" and dtype.kind != "f"):
        raise errors.InvalidArgument(f"model input {name!r} takes {dtype} values; got an array of {a.dtype}")
    if dtype.kind in "iu" and a.size:
        info = np.iinfo(dtype)
        if a.min() < info.min or a.max() > info.max:
            raise errors.InvalidArgument(f"model input {name!r} takes {dtype} values; got values out of its range")
    return a.astype(dtype)


def _run_failed(code: int) -> errors.TaskFailed:
    return errors.TaskFailed(f"MNN runSession failed with error code {code}")


def _host_dim_type(mnn: Any, tensor: Any) -> Any:
    """Host copies use the device tensor's layout, except NC4HW4 which is internal: use NCHW."""
    dim = tensor.getDimensionType()
    return mnn.Tensor_DimensionType_Caffe if dim == mnn.Tensor_DimensionType_Caffe_C4 else dim


def _same_memory(view: np.ndarray, tensor: Any) -> bool:
    fresh = tensor.getNumpyData()
    return bool(fresh.__array_interface__["data"][0] == view.__array_interface__["data"][0])


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


class OnnxRuntimeModel(_Names):
    def __init__(self, session: Any, backend: str) -> None:
        self._session = session
        self._backend = backend
        self._input_names = [i.name for i in session.get_inputs()]
        self._output_names = [o.name for o in session.get_outputs()]

    @property
    def input_types(self) -> dict[str, np.dtype[Any]]:  # "tensor(int64)" -> int64; unknown: float32
        return {i.name: np.dtype(_ORT_TYPES.get(i.type, np.float32)) for i in self._session.get_inputs()}

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
