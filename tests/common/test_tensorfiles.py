"""Global models and updates as safetensors files: round trips, the stated quantization errors, refusals."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from hypothesis.extra import numpy as hnp

from tether.common import tensorfiles

LIKE = {"dense/w": np.zeros((4, 3), dtype=np.float32), "dense/b": np.zeros(3, dtype=np.float32)}


def delta(seed: int = 0, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(a.shape) * scale).astype(np.float32) for n, a in LIKE.items()}


def test_a_model_file_round_trips() -> None:
    model = delta()
    meta = {"task": "ml/x", "round": 3, "a": "b", "z": [1, 2]}
    data = tensorfiles.dump(model, metadata=meta)
    got = tensorfiles.load(data)
    assert got.keys() == model.keys() and all(np.array_equal(got[n], model[n]) for n in model)
    assert tensorfiles.metadata(data) == meta
    # the same tensors and metadata always make the same bytes (a model's digest is reproducible)
    assert all(
        tensorfiles.dump(dict(reversed(model.items())), metadata=dict(reversed(meta.items()))) == data
        for _ in range(20)
    )


def test_float32_updates_are_exact() -> None:
    d = delta()
    got = tensorfiles.decode_update(tensorfiles.encode_update(d, encoding="float32"), encoding="float32", like=LIKE)
    assert all(np.array_equal(got[n], d[n]) and got[n].dtype == np.float32 for n in d)


finite = hnp.arrays(np.float64, hs.integers(1, 50), elements=hs.floats(-1e4, 1e4, allow_nan=False))


@settings(max_examples=60, deadline=None)
@given(finite)
def test_int8_error_is_at_most_max_abs_over_254(x: np.ndarray) -> None:
    like = {"t": np.zeros(x.shape, dtype=np.float64)}
    got = tensorfiles.decode_update(tensorfiles.encode_update({"t": x}, encoding="int8"), encoding="int8", like=like)
    bound = float(np.abs(x).max()) / 254.0
    assert float(np.abs(got["t"] - x).max()) <= bound * (1 + 1e-9) + 1e-300


@settings(max_examples=60, deadline=None)
@given(finite)
def test_float16_relative_error_is_at_most_2_to_the_minus_11_in_the_normal_range(x: np.ndarray) -> None:
    like = {"t": np.zeros(x.shape, dtype=np.float64)}
    got = tensorfiles.decode_update(
        tensorfiles.encode_update({"t": x}, encoding="float16"), encoding="float16", like=like
    )["t"]
    normal = np.abs(x) >= 6.104e-5
    assert np.all(np.abs(got - x)[normal] <= np.abs(x)[normal] * 2.0**-11)
    assert np.all(np.abs(got - x)[~normal] <= 2.0**-25)


def test_refusals_name_the_tensor() -> None:
    with pytest.raises(tensorfiles.InvalidTensors, match="beyond 65504"):
        tensorfiles.encode_update({"w": np.array([1e5])}, encoding="float16")
    with pytest.raises(tensorfiles.InvalidTensors, match="NaN"):
        tensorfiles.encode_update({"w": np.array([np.nan])}, encoding="float32")
    f64 = tensorfiles.dump({"dense/w": np.zeros((4, 3))})
    with pytest.raises(tensorfiles.InvalidTensors, match=r"delta\['dense/w'\]: has dtype float64"):
        tensorfiles.decode_update(f64, encoding="float32", like=LIKE)
    no_scale = tensorfiles.dump({"w": np.zeros(3, dtype=np.int8)})
    with pytest.raises(tensorfiles.InvalidTensors, match="scale"):
        tensorfiles.decode_update(no_scale, encoding="int8", like={})
    for junk in (b"", b"\xff" * 8 + b"{}", (5).to_bytes(8, "little") + b"[1,2]", b"\x02\0\0\0\0\0\0\0{}junk"):
        with pytest.raises(tensorfiles.InvalidTensors):
            tensorfiles.decode_update(junk, encoding="float32", like=LIKE)
    with pytest.raises(tensorfiles.InvalidTensors, match="encoding"):
        tensorfiles.encode_update({}, encoding="int4")


def test_views_read_the_tensors_in_place_and_write_through_a_bytearray() -> None:
    model = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1.5, -2.0], np.float64)}
    data = bytearray(tensorfiles.dump(model, metadata={"round": "1"}))
    got = tensorfiles.views(data)
    assert sorted(got) == ["b", "w"]
    assert np.array_equal(got["w"], model["w"]) and got["w"].dtype == np.float32 and got["w"].shape == (3, 4)
    assert np.array_equal(got["b"], model["b"])
    got["w"][0, 0] = 99.0  # a view of the buffer, not a copy
    assert tensorfiles.load(bytes(data))["w"][0, 0] == 99.0
    assert not tensorfiles.views(bytes(data))["w"].flags.writeable


def test_views_refuse_offsets_that_do_not_hold_the_shape() -> None:
    data = tensorfiles.dump({"w": np.zeros(4, np.float32)})
    (size,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + size].replace(b'"shape":[4]', b'"shape":[5]')
    bad = data[:8] + header + data[8 + size :]
    with pytest.raises(tensorfiles.InvalidTensors, match=r"tensor 'w': data_offsets"):
        tensorfiles.views(bad)
    with pytest.raises(tensorfiles.InvalidTensors, match="not a safetensors file"):
        tensorfiles.views(b"abc")
