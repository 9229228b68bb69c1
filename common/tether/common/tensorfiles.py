"""Named tensors as safetensors files: a federated task's global model, and a device's update on the wire.

One format for both directions, shared by the agent (which encodes updates)
and the controller (which decodes them and writes each round's model):
safetensors (a JSON header and raw little-endian buffers, no pickle, well
kept by Hugging Face). An update is encoded as the task asks
(`spec.federated.updateEncoding`):

- float32: `F32` tensors, exact for a float32 model.
- float16: `F16` tensors; relative error at most 2^-11 per value in the
  normal range (|x| >= 6.1e-5; below it the absolute error is at most
  2^-25); a value beyond float16's 65504 cannot be encoded and is refused.
- int8: `I8` tensors with a per-tensor symmetric scale in the file's
  metadata (`{"scales": {name: scale}}`): x ~ q·scale, scale = max|x| / 127,
  so the absolute error per value is at most scale / 2 = max|x| / 254.

Metadata is one entry, `"tether"`: canonical JSON (sorted keys). The library
keeps metadata in a hash map whose order varies between runs, so with one
entry the same tensors always make the same bytes: a model's digest is
reproducible (a redelivered aggregation writes the same blob).

Decoding checks that each tensor has the dtype its encoding promises and
returns float arrays in the model's dtype; names, shapes and values are the
round's checks (`tether.controller.fl.updates.check`). Errors are
`InvalidTensors`, naming the tensor. `views` reads a file's tensors in
place (NumPy views of the bytes, writable over a `bytearray`), so a worker
holds a model or an update once, not as the file and a copy of it.
Pure: numpy and safetensors, no I/O.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import safetensors.numpy as st

from tether.common import errors

FLOAT32 = "float32"
FLOAT16 = "float16"
INT8 = "int8"
ENCODINGS = (FLOAT32, FLOAT16, INT8)
_WIRE_DTYPE = {FLOAT32: np.dtype(np.float32), FLOAT16: np.dtype(np.float16), INT8: np.dtype(np.int8)}
MAX_HEADER_BYTES = 16 * 1024 * 1024
FLOAT16_MAX = float(np.finfo(np.float16).max)

Tensors = dict[str, npt.NDArray[Any]]


class InvalidTensors(errors.InvalidArgument):
    """A file or tensor that cannot be read as the format says; the message names the tensor."""

    reason = "InvalidUpdate"


META_KEY = "tether"


def dump(tensors: Mapping[str, npt.NDArray[Any]], *, metadata: Mapping[str, Any] | None = None) -> bytes:
    """A safetensors file of `tensors` (C-contiguous copies) and JSON `metadata`; the same input, the same bytes."""
    arrays = {n: np.ascontiguousarray(a) for n, a in sorted(tensors.items())}
    meta = {META_KEY: json.dumps(dict(metadata), sort_keys=True, separators=(",", ":"))} if metadata else None
    return bytes(st.save(arrays, metadata=meta))


def load(data: bytes, *, what: str = "model") -> Tensors:
    """The tensors of a safetensors file; `InvalidTensors` when it is not one."""
    _header(data, what=what)
    try:
        return dict(st.load(data))
    except Exception as e:  # the library raises its own SafetensorError and others for malformed files
        raise InvalidTensors(f"{what}: not a readable safetensors file: {e}") from None


_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
}


def views(data: bytes | bytearray, *, what: str = "model") -> Tensors:
    """The tensors of a safetensors file as views of `data` (no copy; writable when `data` is a bytearray).

    Offsets, sizes and dtypes are checked against the header; a file the views cannot cover is `InvalidTensors`."""
    header = _header(bytes(data[:8]) + bytes(data[8 : 8 + _header_size(data)]), what=what, whole=len(data))
    start = 8 + _header_size(data)
    out: Tensors = {}
    spans: list[tuple[int, int]] = []
    for name, entry in sorted(header.items()):
        if name == "__metadata__":
            continue
        where = f"{what}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise InvalidTensors(f"{where}: header entry must be an object")
        dtype = _NUMPY_DTYPES.get(str(entry.get("dtype")))
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if dtype is None:
            raise InvalidTensors(f"{where}: dtype {entry.get('dtype')!r} is not one of {sorted(_NUMPY_DTYPES)}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise InvalidTensors(f"{where}: shape must be a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise InvalidTensors(f"{where}: data_offsets must be two integers")
        begin, end = offsets
        count = math.prod(shape)
        if not 0 <= begin <= end <= len(data) - start or end - begin != count * dtype.itemsize:
            raise InvalidTensors(f"{where}: data_offsets {offsets} do not hold {shape} of {dtype}")
        spans.append((begin, end))
        out[name] = np.frombuffer(data, dtype=dtype, count=count, offset=start + begin).reshape(shape)
    at = 0
    for begin, end in sorted(spans):  # as the library checks: the buffers tile the data, no gap, no overlap
        if begin != at:
            raise InvalidTensors(f"{what}: tensor buffers overlap or leave a gap at byte {at}")
        at = end
    if at != len(data) - start:
        raise InvalidTensors(f"{what}: {len(data) - start - at} bytes after the last tensor")
    return out


def _header_size(data: bytes | bytearray) -> int:
    if len(data) < 8:
        return 0
    (size,) = struct.unpack("<Q", bytes(data[:8]))
    return int(min(size, MAX_HEADER_BYTES + 1))


def metadata(data: bytes, *, what: str = "model") -> dict[str, Any]:
    """The file's metadata as `dump` wrote it ({} when it has none)."""
    meta = _header(data, what=what).get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise InvalidTensors(f"{what}: __metadata__ must map strings to strings")
    if META_KEY not in meta:
        return {}
    try:
        doc = json.loads(meta[META_KEY])
    except (ValueError, RecursionError):
        raise InvalidTensors(f"{what}: metadata {META_KEY!r} is not JSON") from None
    if not isinstance(doc, dict):
        raise InvalidTensors(f"{what}: metadata {META_KEY!r} must be a JSON object")
    return doc


def _header(data: bytes, *, what: str, whole: int | None = None) -> dict[str, Any]:
    """The JSON header of a file (`data` may be the file's head only, with `whole` its full length)."""
    length = len(data) if whole is None else whole
    if length < 8:
        raise InvalidTensors(f"{what}: not a safetensors file ({length} bytes)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(MAX_HEADER_BYTES, length - 8):
        raise InvalidTensors(f"{what}: header of {size} bytes does not fit the file")
    try:
        header = json.loads(data[8 : 8 + size])
    except (ValueError, RecursionError):
        raise InvalidTensors(f"{what}: header is not JSON") from None
    if not isinstance(header, dict):
        raise InvalidTensors(f"{what}: header must be a JSON object")
    return header


def encode_update(delta: Mapping[str, npt.NDArray[Any]], *, encoding: str) -> bytes:
    """A device's update as the bytes PushUpdate carries."""
    if encoding not in ENCODINGS:
        raise InvalidTensors(f"encoding {encoding!r} is not one of {list(ENCODINGS)}")
    out: Tensors = {}
    scales: dict[str, float] = {}
    for name, value in sorted(delta.items()):
        a = np.asarray(value, dtype=np.float64)
        if not np.isfinite(a).all():
            raise InvalidTensors(f"delta[{name!r}]: holds NaN or infinite values")
        if encoding == FLOAT32:
            out[name] = a.astype(np.float32)
        elif encoding == FLOAT16:
            if a.size and float(np.abs(a).max()) > FLOAT16_MAX:
                raise InvalidTensors(f"delta[{name!r}]: values beyond {FLOAT16_MAX:g} cannot be sent as float16")
            out[name] = a.astype(np.float16)
        else:
            top = float(np.abs(a).max()) if a.size else 0.0
            scale = top / 127.0 if top > 0 else 1.0
            out[name] = np.clip(np.rint(a / scale), -127, 127).astype(np.int8)
            scales[name] = scale
    meta: dict[str, Any] = {"encoding": encoding}
    if encoding == INT8:
        meta["scales"] = scales
    return dump(out, metadata=meta)


def decode_update(data: bytes, *, encoding: str, like: Mapping[str, npt.NDArray[Any]]) -> Tensors:
    """An update's tensors as float arrays in the dtype of the model `like` (same names where it has them)."""
    if encoding not in ENCODINGS:
        raise InvalidTensors(f"encoding {encoding!r} is not one of {list(ENCODINGS)}")
    tensors = views(data, what="update")  # in place: a float32 update is never copied
    scales = metadata(data, what="update").get("scales") if encoding == INT8 else {}
    if not isinstance(scales, dict):
        raise InvalidTensors("update: int8 needs the tensors' scales in its metadata")
    wire = _WIRE_DTYPE[encoding]
    out: Tensors = {}
    for name, q in sorted(tensors.items()):
        where = f"delta[{name!r}]"
        if q.dtype != wire:
            raise InvalidTensors(f"{where}: has dtype {q.dtype}, encoding {encoding} sends {wire}")
        target = like[name].dtype if name in like else np.dtype(np.float32)
        if encoding == INT8:
            raw = scales.get(name)
            scale = float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else math.nan
            if not (math.isfinite(scale) and scale > 0):
                raise InvalidTensors(f"{where}: int8 needs a positive finite scale for it in the metadata")
            out[name] = (q.astype(np.float64) * scale).astype(target)
        else:
            out[name] = q.astype(target, copy=False)
    return out
