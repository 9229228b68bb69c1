"""MNNModel's fast path (inputs written into the session's own memory, outputs read from it) computes
exactly what MNN's documented copyFrom / copyToHostTensor path computes, and stays safe: outputs are
copies, shapes and dtypes are validated, a resize makes a new plan, concurrent calls are serialised."""

from __future__ import annotations

import pathlib
import threading
import types
from typing import Any

import numpy as np
import pytest

from tether.agent import engine
from tether.common import errors

MODELS = pathlib.Path(__file__).resolve().parents[2] / "bench" / "models"
SHAPES = {"mlp": (1, 64), "cnn": (1, 1, 8, 8), "efficientnet_lite0": (1, 3, 224, 224)}


def reference(name: str, a: np.ndarray) -> dict[str, np.ndarray]:
    """The model run through MNN's Session API the documented way: copyFrom in, copyToHostTensor out."""
    import MNN

    interp = MNN.Interpreter(str(MODELS / f"{name}.mnn"))
    session = interp.createSession({"backend": "CPU", "numThread": 1, "precision": "high"})
    tensor = interp.getSessionInput(session, "input")
    interp.resizeTensor(tensor, a.shape)
    interp.resizeSession(session)
    a = np.ascontiguousarray(a, dtype=np.float32)
    tensor.copyFrom(MNN.Tensor(a.shape, MNN.Halide_Type_Float, a, MNN.Tensor_DimensionType_Caffe))
    assert interp.runSession(session) == 0
    out = {}
    for n in interp.getSessionOutputAll(session):
        o = interp.getSessionOutput(session, n)
        host = MNN.Tensor(o.getShape(), MNN.Halide_Type_Float, np.zeros(o.getShape(), np.float32), o.getDimensionType())
        o.copyToHostTensor(host)
        out[n] = np.array(host.getNumpyData(), copy=True)
    return out


def load(name: str) -> engine.MNNModel:
    return engine.MNNEngine().load(str(MODELS / f"{name}.mnn"))


def random_input(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        assert np.array_equal(got[k], want[k]), k


def uses_session_memory(model: engine.MNNModel) -> bool:
    plan = model._plan
    return (
        plan is not None
        and plan.checked
        and all(i.view is not None for i in plan.inputs)
        and all(o.view is not None for o in plan.outputs)
    )


@pytest.mark.parametrize("name", ["mlp", "cnn", "efficientnet_lite0"])
def test_fast_path_matches_copyfrom_path(name: str) -> None:
    model = load(name)
    general = load(name)
    general._zero_copy = False  # the wrapper's copyFrom / copyToHostTensor path, for comparison
    for seed in range(3):
        a = random_input(SHAPES[name], seed)
        want = reference(name, a)
        assert_same(model.run({"input": a}), want)
        assert_same(general.run({"input": a}), want)
    assert model.backend == "mnn/cpu"
    assert uses_session_memory(model)  # the CPU backend's host-layout tensors pass the checks
    assert not uses_session_memory(general)


def test_outputs_are_copies_not_views_of_session_memory() -> None:
    model = load("mlp")
    a, b = random_input((1, 64), 0), random_input((1, 64), 1)
    model.run({"input": b})  # planned and checked: what follows takes the fast path
    first = model.run({"input": a})["probs"]
    kept = first.copy()
    second = model.run({"input": b})["probs"]
    assert np.array_equal(first, kept)  # the next inference did not overwrite an earlier result
    assert not np.array_equal(first, second)
    assert not np.shares_memory(first, second)
    first[...] = -1.0  # mutating a result does not reach the model
    assert np.array_equal(model.run({"input": a})["probs"], kept)
    assert first.flags.owndata and first.flags.writeable


def test_inputs_are_not_kept() -> None:
    model = load("mlp")
    a = random_input((1, 64), 0)
    want = model.run({"input": a})["probs"]
    a_before = a.copy()
    b = random_input((1, 64), 1)
    model.run({"input": b})
    b[...] = 0.0  # changing an array after the call does not change what the model saw
    assert np.array_equal(a, a_before)
    assert np.array_equal(model.run({"input": a})["probs"], want)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_resize_to_a_new_batch_and_back(name: str) -> None:
    model = load(name)
    one = random_input(SHAPES[name], 0)
    five = random_input((5, *SHAPES[name][1:]), 1)
    assert_same(model.run({"input": one}), reference(name, one))
    assert_same(model.run({"input": five}), reference(name, five))
    assert uses_session_memory(model)  # views fetched again after the resize
    assert_same(model.run({"input": one}), reference(name, one))
    model.resize({"input": five.shape})
    assert_same(model.run({"input": five}), reference(name, five))
    assert_same(model.run({"input": one}), reference(name, one))


def test_failed_resize_leaves_the_model_usable() -> None:
    model = load("mlp")
    a = random_input((1, 64), 0)
    want = model.run({"input": a})
    with pytest.raises(errors.InvalidArgument, match="does not accept input shapes"):
        model.run({"input": np.zeros((1, 63), np.float32)})
    assert_same(model.run({"input": a}), want)


def test_float64_and_other_real_dtypes_are_converted() -> None:
    model = load("mlp")
    a = random_input((1, 64), 0)
    want = model.run({"input": a})
    assert_same(model.run({"input": a.astype(np.float64)}), want)
    ints = (a * 10).astype(np.int32)
    want_ints = model.run({"input": ints.astype(np.float32)})
    assert_same(model.run({"input": ints}), want_ints)
    assert_same(model.run({"input": ints.astype(np.int64)}), want_ints)


def test_non_contiguous_and_other_mappings_give_the_same_results() -> None:
    model = load("cnn")
    a = random_input((1, 1, 8, 8), 0)
    want = reference("cnn", a)
    wide = np.zeros((1, 1, 8, 16), np.float32)
    wide[..., ::2] = a
    strided = wide[..., ::2]
    assert not strided.flags.c_contiguous
    assert_same(model.run({"input": strided}), want)
    assert_same(model.run({"input": np.asfortranarray(a)}), want)
    assert_same(model.run(types.MappingProxyType({"input": a})), want)
    assert_same(model.run({"input": a}), want)


def test_wrong_names_shapes_and_dtypes_are_invalid_arguments() -> None:
    model = load("mlp")
    a = random_input((1, 64), 0)
    model.run({"input": a})  # planned: the checks below must not slip through the fast path
    with pytest.raises(errors.InvalidArgument, match="missing"):
        model.run({"pixels": a})
    with pytest.raises(errors.InvalidArgument, match="unknown"):
        model.run({"input": a, "extra": a})
    with pytest.raises(errors.InvalidArgument, match="mapping"):
        model.run([a])  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument, match="does not accept input shapes"):
        model.run({"input": np.zeros((64,), np.float32)})
    with pytest.raises(errors.InvalidArgument, match="takes float32"):
        model.run({"input": np.full((1, 64), "x")})
    with pytest.raises(errors.InvalidArgument, match="takes float32"):
        model.run({"input": a.astype(np.complex64)})
    assert_same(model.run({"input": a}), reference("mlp", a))


def _tiny_model(tmp_path: pathlib.Path, *, ints: bool) -> engine.MNNModel:
    """relu(x) on a [1, 4] input (int32 cast to float when `ints`), saved with MNN's expression API."""
    import MNN

    F = MNN.expr
    x = F.placeholder([1, 4], F.NCHW, F.int) if ints else F.placeholder([1, 4], F.NCHW)
    x.name = "x"
    y = F.relu(F.cast(x, F.float) if ints else x)
    y.name = "y"
    path = tmp_path / "tiny.mnn"
    F.save([y], str(path))
    return engine.MNNEngine().load(str(path))


def test_integer_input_model(tmp_path: pathlib.Path) -> None:
    model = _tiny_model(tmp_path, ints=True)
    ids = np.array([[1, -2, 3, 4]], np.int32)
    want = np.array([[1, 0, 3, 4]], np.float32)
    assert np.array_equal(model.run({"x": ids})["y"], want)
    assert uses_session_memory(model)
    assert np.array_equal(model.run({"x": ids.astype(np.int64)})["y"], want)
    with pytest.raises(errors.InvalidArgument, match="takes int32"):
        model.run({"x": ids.astype(np.float32)})
    with pytest.raises(errors.InvalidArgument, match="out of its range"):
        model.run({"x": np.array([[2**40, 0, 0, 0]], np.int64)})


def test_output_view_is_decided_only_on_an_informative_output(tmp_path: pathlib.Path) -> None:
    model = _tiny_model(tmp_path, ints=False)
    zeros = model.run({"x": -np.ones((1, 4), np.float32)})["y"]
    assert np.array_equal(zeros, np.zeros((1, 4), np.float32))
    assert model._plan is not None and not model._plan.checked  # all zeros prove nothing about the layout
    x = np.array([[0.5, -1.0, 2.0, 3.0]], np.float32)
    assert np.array_equal(model.run({"x": x})["y"], np.maximum(x, 0))
    assert uses_session_memory(model)
    assert np.array_equal(zeros, np.zeros((1, 4), np.float32))


def test_output_that_never_informs_is_copied_for_good(tmp_path: pathlib.Path) -> None:
    model = _tiny_model(tmp_path, ints=False)
    negative = -np.ones((1, 4), np.float32)
    for _ in range(engine._UNDECIDED_RUNS):
        assert np.array_equal(model.run({"x": negative})["y"], np.zeros((1, 4), np.float32))
    plan = model._plan
    assert plan is not None and plan.checked and plan.outputs[0].view is None and plan.inputs[0].view is not None
    x = np.array([[0.5, -1.0, 2.0, 3.0]], np.float32)
    assert np.array_equal(model.run({"x": x})["y"], np.maximum(x, 0))


def test_two_inputs_two_outputs(tmp_path: pathlib.Path) -> None:
    import MNN

    F = MNN.expr
    x, y = F.placeholder([1, 4], F.NCHW), F.placeholder([1, 4], F.NCHW)
    x.name, y.name = "x", "y"
    total, positive = x + y, F.relu(x)
    total.name, positive.name = "total", "positive"
    F.save([total, positive], str(tmp_path / "two.mnn"))
    model = engine.MNNEngine().load(str(tmp_path / "two.mnn"))
    a, b = np.array([[1.0, -2.0, 3.0, -4.0]], np.float32), np.array([[0.5, 0.5, 0.5, 0.5]], np.float32)

    def check(got: dict[str, np.ndarray], a: np.ndarray, b: np.ndarray) -> None:
        assert sorted(got) == ["positive", "total"]
        assert np.array_equal(got["total"], a + b) and np.array_equal(got["positive"], np.maximum(a, 0))

    model.run({"x": a, "y": b})
    first = model.run({"y": b, "x": a})  # the order of the dict does not matter
    assert uses_session_memory(model)
    check(first, a, b)
    second = model.run({"x": b, "y": a})
    check(second, b, a)
    check(first, a, b)  # not overwritten by the next inference
    # The first input passes the fast checks and is written, the second does not: all is written again.
    check(model.run({"x": -a, "y": b.astype(np.float64)}), -a, b)
    with pytest.raises(errors.InvalidArgument, match="missing"):
        model.run({"x": a})
    check(model.run({"x": a, "y": b}), a, b)


def test_concurrent_calls_from_threads_are_correct() -> None:
    model = load("cnn")
    # Two batch sizes: threads force resizes in between each other's calls.
    arrays = [random_input((1 if i % 2 else 3, 1, 8, 8), i) for i in range(8)]
    wants = [reference("cnn", a) for a in arrays]
    failures: list[Any] = []
    start = threading.Barrier(4)

    def worker(t: int) -> None:
        start.wait()
        for j in range(60):
            i = (t + j) % 8 if t < 2 else 2 * ((t + j) % 4) + 1  # threads 2 and 3 stay on batch 1
            got = model.run({"input": arrays[i]})
            if not np.array_equal(got["probs"], wants[i]["probs"]):
                failures.append((t, j, i))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert failures == []
