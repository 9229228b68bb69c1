"""Inputs of the right dtype and meaning for a model: shipped samples first, else generated per dtype and name.

Selection, conversion checking, the on-device cross-check and the runtime
benchmark all run a model on inputs nobody gave them. Float noise is fine for
an image model; a transformer encoder or a recommendation model takes token
ids, attention masks and categorical features, where noise is wrong (an MNN
int input fed floats) and zeros prove nothing (an all-zero attention mask
makes a wrongly converted model and the right one both answer zeros).

Where the inputs come from, in order:

1. Sample inputs the bundle ships beside the model: `<stem>.inputs.npz`
   (`model.onnx` / `model.mnn` -> `model.inputs.npz`), a NumPy `.npz` loaded
   with `allow_pickle=False`: one array per model input, named as the input,
   either of the input's shape (one sample) or with one more leading axis
   (N samples, at most `MAX_SAMPLES`), numeric or bool, at most
   `MAX_SAMPLE_BYTES` in all. Values are cast to the engine's element type
   (an ONNX int64 input is int32 in MNN) with a range check.
2. Generated, per dtype and input name (`generate`): float inputs standard
   normal; bool inputs and integer inputs named like a mask (`mask`) ones in
   the first sample, then with the tail padded (zeros) in later samples;
   `token_type` / `segment` ids 0 then 1 on the second half; `position` ids
   0..n-1; every other integer input (token ids, categorical features)
   uniform in [0, bound), the bound declared by the caller
   (`tether model convert --int-range NAME=LOW:HIGH`), else read from the
   ONNX model (`onnx_int_bounds`: the row count of the embedding table a
   `Gather` indexes with that input, when the `onnx` package is installed),
   else `DEFAULT_INT_BOUND` (2: ids 0 and 1 fit any table).

`compare` judges two engines' outputs on the same inputs: every output must
exist with the same shape and differ by at most `tolerance` times
max(1, max |reference|) (`TOLERANCE_FP32`: 1e-3 for a model computed in fp32,
`TOLERANCE_FP16`: 2e-2 for weights stored as fp16). No I/O apart from
`load_samples` and `onnx_int_bounds`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tether.common import errors

SAMPLES_SUFFIX = ".inputs.npz"
MAX_SAMPLES = 64
MAX_SAMPLE_BYTES = 64 * 1024 * 1024
DEFAULT_INT_BOUND = 2
TOLERANCE_FP32 = 1e-3
TOLERANCE_FP16 = 2e-2
GENERATED_SAMPLES = 3  # how many inputs checks generate when no samples ship

Sample = dict[str, np.ndarray]


class SampleError(errors.InvalidArgument):
    """A sample-input file that cannot be used (names the file and the input)."""


class Mismatch(errors.VerificationFailed):
    """Two engines computed different outputs on the same inputs."""


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One model input: name, concrete shape (dynamic dimensions as 1 unless declared), element type."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]


def samples_path_for(model_path: str | os.PathLike[str]) -> pathlib.Path:
    """Where a model's sample inputs live: `model.onnx` -> `model.inputs.npz`."""
    p = pathlib.Path(model_path)
    return p.with_name(p.name.rsplit(".", 1)[0] + SAMPLES_SUFFIX if "." in p.name else p.name + SAMPLES_SUFFIX)


def describe(model: Any, shapes: Mapping[str, Sequence[int]] | None = None) -> list[InputSpec]:
    """The inputs of a loaded model (`engine.Model`): declared shapes win, else the model's own."""
    declared = dict(shapes or {})
    own = _model_shapes(model)
    types = dict(getattr(model, "input_types", {}) or {})
    out = []
    for name in model.input_names:
        raw = declared.get(name) or own.get(name) or (1,)
        shape = tuple(int(d) if isinstance(d, int | np.integer) and int(d) > 0 else 1 for d in raw)
        out.append(InputSpec(name, shape, np.dtype(types.get(name, np.float32))))
    return out


def _model_shapes(model: Any) -> dict[str, tuple[Any, ...]]:
    shapes = getattr(model, "_shapes", None)  # MNNModel
    if isinstance(shapes, dict):
        return dict(shapes)
    session = getattr(model, "_session", None)  # OnnxRuntimeModel
    if session is not None and hasattr(session, "get_inputs"):
        return {i.name: tuple(i.shape) for i in session.get_inputs()}
    return {}


def _kind(name: str) -> str:
    n = name.lower()
    if "mask" in n:
        return "mask"
    if "token_type" in n or "segment" in n:
        return "segment"
    if "position" in n:
        return "position"
    return "ids"


def generate(
    specs: Sequence[InputSpec],
    *,
    count: int = 1,
    seed: int = 0,
    int_bounds: Mapping[str, tuple[int, int]] | None = None,
) -> list[Sample]:
    """`count` deterministic samples of the right dtype and meaning (see the module docstring)."""
    rng = np.random.default_rng(seed)
    bounds = dict(int_bounds or {})
    samples: list[Sample] = [{} for _ in range(count)]
    for spec in specs:
        dt = spec.dtype
        for i in range(count):
            if dt.kind in "fc":
                a = rng.standard_normal(spec.shape).astype(dt)
            else:
                a = _integer_sample(spec, i, rng, bounds.get(spec.name))
            samples[i][spec.name] = a
    return samples


def _integer_sample(spec: InputSpec, i: int, rng: np.random.Generator, bound: tuple[int, int] | None) -> np.ndarray:
    dt, shape = spec.dtype, spec.shape
    last = shape[-1] if shape else 1
    kind = "mask" if dt.kind == "b" else _kind(spec.name)
    if kind == "mask":  # all ones, then shorter sequences padded with zeros at the end
        a = np.ones(shape, dt)
        if i and last > 1:
            keep = max(1, last - (i * last) // (GENERATED_SAMPLES + 1))
            a[..., keep:] = 0
        return a
    if kind == "segment":
        a = np.zeros(shape, dt)
        if i and last > 1:
            a[..., last // 2 :] = 1
        return a
    if kind == "position":
        return np.broadcast_to(np.arange(last, dtype=dt), shape).copy()
    low, high = bound if bound is not None else (0, DEFAULT_INT_BOUND)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        low, high = max(low, int(info.min)), min(high, int(info.max) + 1)
    return rng.integers(low, max(high, low + 1), size=shape).astype(dt)


def load_samples(path: str | os.PathLike[str], specs: Sequence[InputSpec]) -> list[Sample]:
    """Samples from an `.npz` (format in the module docstring), cast to each input's dtype; SampleError if unusable."""
    p = pathlib.Path(path)
    try:
        with zipfile.ZipFile(p) as z:  # sizes first: np.load would inflate whatever the archive says
            total = sum(info.file_size for info in z.infolist())
    except (OSError, zipfile.BadZipFile) as e:
        raise SampleError(f"{p.name}: not a readable .npz file: {e}") from None
    if total > MAX_SAMPLE_BYTES:
        raise SampleError(f"{p.name}: {total} bytes of arrays, more than {MAX_SAMPLE_BYTES}")
    try:
        with np.load(p, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as e:
        raise SampleError(f"{p.name}: cannot be read without pickle: {e}") from None
    return samples_from_arrays(arrays, specs, source=p.name)


def samples_from_arrays(arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec], *, source: str) -> list[Sample]:
    by_name = {s.name: s for s in specs}
    if unknown := sorted(set(arrays) - set(by_name)):
        raise SampleError(f"{source}: arrays {unknown} are not inputs of the model (inputs: {sorted(by_name)})")
    if missing := sorted(set(by_name) - set(arrays)):
        raise SampleError(f"{source}: no array for inputs {missing}")
    count: int | None = None
    per_input: dict[str, np.ndarray] = {}
    for name, spec in by_name.items():
        a = np.asarray(arrays[name])
        if a.dtype.kind not in "biuf":
            raise SampleError(f"{source}: {name}: arrays of {a.dtype} are not model inputs")
        if a.ndim == len(spec.shape):
            a = a[None]
        if a.shape[1:] != spec.shape:
            raise SampleError(f"{source}: {name}: shape {a.shape} is neither {spec.shape} nor (N, *{spec.shape})")
        if count is not None and a.shape[0] != count:
            raise SampleError(f"{source}: {name}: {a.shape[0]} samples, other inputs have {count}")
        count = a.shape[0]
        if not 1 <= count <= MAX_SAMPLES:
            raise SampleError(f"{source}: {name}: {count} samples; between 1 and {MAX_SAMPLES}")
        per_input[name] = cast(name, a, spec.dtype, source=source)
    assert count is not None
    return [{name: np.ascontiguousarray(a[i]) for name, a in per_input.items()} for i in range(count)]


def cast(name: str, a: np.ndarray, dtype: np.dtype[Any], *, source: str = "inputs") -> np.ndarray:
    """`a` as `dtype` (ints range-checked; floats never into an integer input)."""
    if a.dtype == dtype:
        return a
    if a.dtype.kind == "f" and dtype.kind in "iub":
        raise SampleError(f"{source}: {name}: float values for an input of {dtype}")
    if dtype.kind in "iu" and a.size:
        info = np.iinfo(dtype)
        if int(a.min()) < info.min or int(a.max()) > info.max:
            raise SampleError(f"{source}: {name}: values out of the range of {dtype}")
    return a.astype(dtype)


def for_model(
    specs: Sequence[InputSpec],
    *,
    samples: str | os.PathLike[str] | None = None,
    count: int = GENERATED_SAMPLES,
    int_bounds: Mapping[str, tuple[int, int]] | None = None,
) -> list[Sample]:
    """The shipped samples when there are some, else `count` generated ones."""
    if samples is not None and pathlib.Path(samples).is_file():
        return load_samples(samples, specs)
    return generate(specs, count=count, int_bounds=int_bounds)


def feed(sample: Mapping[str, np.ndarray], specs: Sequence[InputSpec]) -> Sample:
    """One sample cast to another engine's element types (the same values)."""
    return {s.name: cast(s.name, np.asarray(sample[s.name]), s.dtype) for s in specs}


def onnx_int_bounds(onnx_path: str | os.PathLike[str]) -> dict[str, tuple[int, int]]:
    """Integer inputs used as indices of an embedding table (`Gather` on an initializer): name -> [0, rows).

    Needs the `onnx` package (a build or development machine; not an agent dependency): {} without it.
    """
    try:
        import onnx
    except ImportError:
        return {}
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:
        return {}
    graph = model.graph
    inputs = {i.name for i in graph.input}
    tables = {t.name: list(t.dims) for t in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type in ("Cast", "Identity") and n.input}
    out: dict[str, tuple[int, int]] = {}
    for n in graph.node:
        if n.op_type != "Gather" or len(n.input) < 2 or n.input[0] not in tables:
            continue
        src = n.input[1]
        while src in alias and src not in inputs:
            src = alias[src]
        if src not in inputs:
            continue
        axis = next((int(a.i) for a in n.attribute if a.name == "axis"), 0)
        dims = tables[n.input[0]]
        rows = int(dims[axis]) if -len(dims) <= axis < len(dims) else 0
        if rows > 0:
            out[src] = (0, min(rows, out.get(src, (0, rows))[1]))
    return out


def compare(
    want: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], *, tolerance: float, what: str = ""
) -> float:
    """The largest difference, scaled; Mismatch naming the output when one is missing, reshaped or too far off."""
    worst = 0.0
    for name, ref in want.items():
        if name not in got:
            raise Mismatch(f"{what}no output {name!r}; it has {sorted(got)}")
        out = np.asarray(got[name])
        if out.shape != ref.shape:
            raise Mismatch(f"{what}output {name!r}: shape {out.shape}, the reference has {ref.shape}")
        if not ref.size:
            continue
        ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
        if not np.all(np.isfinite(out64) == np.isfinite(ref64)):
            raise Mismatch(f"{what}output {name!r}: non-finite values where the reference has none (or back)")
        finite = np.isfinite(ref64)
        err = float(np.max(np.abs(out64 - ref64), where=finite, initial=0.0))
        scale = float(np.max(np.abs(ref64), where=finite, initial=0.0))
        limit = tolerance * max(1.0, scale)
        if not err <= limit or math.isnan(err):
            raise Mismatch(
                f"{what}output {name!r} differs from the reference by up to {err:.3g} "
                f"(scale {scale:.3g}; tolerance {tolerance:g} x max(1, scale) = {limit:.3g})"
            )
        worst = max(worst, err)
    return worst


def all_zero(outputs: Sequence[Mapping[str, np.ndarray]]) -> bool:
    """Whether every output of every sample is exactly zero (such inputs cannot tell two models apart)."""
    return all(not np.any(np.asarray(a)) for out in outputs for a in out.values())
