"""The streaming fold walks tensors in chunks (memory of one float64 model plus one update) and still gives, bit
for bit, what whole-array float64 arithmetic gives; a bad value past the first chunk is still refused."""

from __future__ import annotations

import numpy as np
import pytest

from tether.controller.fl import aggregators, updates
from tether.spec import strategies

SIZE = 2 * updates.CHUNK + 12_345  # three chunks, the last one partial


def _updates(n: int, *, seed: int = 0) -> list[updates.Update]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        delta = {"a": rng.standard_normal((SIZE // 5, 5)).astype(np.float32), "b": rng.standard_normal(7, np.float32)}
        out.append(updates.Update(device=f"d{i}", delta=delta, samples=int(rng.integers(1, 50))))
    return out


def test_chunked_fold_and_apply_equal_whole_array_float64_bit_for_bit() -> None:
    rng = np.random.default_rng(1)
    model = {"a": rng.standard_normal((SIZE // 5, 5)).astype(np.float32), "b": np.zeros(7, np.float32)}
    ups = _updates(4)
    out = aggregators.aggregate(
        strategies.FedAvg(), global_model=model, contributions=ups, state=aggregators.ServerState()
    )
    total = sum(u.samples for u in ups)
    for name in model:
        sums = np.zeros(model[name].shape, np.float64)
        for u in ups:
            sums += float(u.samples) * np.asarray(u.delta[name], dtype=np.float64)
        mean = sums / float(total)
        assert np.array_equal(out.delta[name], mean)
        expected = (np.asarray(model[name], dtype=np.float64) + 1.0 * mean).astype(np.float32)
        assert out.model[name].dtype == np.float32 and np.array_equal(out.model[name], expected)


def test_a_spent_fold_refuses_more_work() -> None:
    model = {"a": np.zeros((SIZE // 5, 5), np.float32), "b": np.zeros(7, np.float32)}
    fold = aggregators.MeanFold(like=model)
    first, second = _updates(2)
    fold.add(first)
    kept = fold.mean()
    assert np.array_equal(fold.mean(consume=True)["a"], kept["a"])
    with pytest.raises(RuntimeError, match="consumed"):
        fold.add(second)
    with pytest.raises(RuntimeError, match="consumed"):
        fold.mean()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_bad_value_in_the_last_chunk_is_refused_with_the_tensor_named(bad: float) -> None:
    model = {"a": np.zeros((SIZE // 5, 5), np.float32), "b": np.zeros(7, np.float32)}
    (u,) = _updates(1)
    u.delta["a"][-1, -1] = bad
    fold = aggregators.MeanFold(like=model)
    with pytest.raises(updates.InvalidUpdate, match=r"delta\['a'\].*NaN or infinite"):
        fold.add(u)
    assert fold.samples == 0 and fold.devices == ()


def test_the_overflow_bound_sees_the_largest_value_in_any_chunk() -> None:
    model = {"a": np.zeros((SIZE // 5, 5), np.float64), "b": np.zeros(7, np.float64)}
    delta = {"a": np.zeros((SIZE // 5, 5), np.float64), "b": np.zeros(7, np.float64)}
    delta["a"][-1, 0] = 1e299
    with pytest.raises(updates.InvalidUpdate, match="too large"):
        updates.check(updates.Update(device="d", delta=delta, samples=100), like=model)


@pytest.mark.parametrize(
    "strategy",
    [
        strategies.FedAvg(),
        strategies.FedAvgM(momentum=0.9),
        strategies.FedOpt(optimizer=strategies.ServerOptimizer.ADAM),
        strategies.Median(),
    ],
)
def test_a_deferred_global_model_gives_the_same_model_bit_for_bit(strategy: strategies.Strategy) -> None:
    rng = np.random.default_rng(2)
    model = {"a": rng.standard_normal((SIZE // 5, 5)).astype(np.float32), "b": np.ones(7, np.float32)}
    ups = _updates(3)
    plain = aggregators.aggregate(strategy, global_model=model, contributions=ups, state=aggregators.ServerState())
    loads: list[int] = []

    def load() -> dict[str, updates.Array]:
        loads.append(1)
        return {n: a.copy() for n, a in model.items()}

    deferred = aggregators.Deferred(like=updates.shapes_of(model), load=load)
    assert all(v.strides == (0,) * v.ndim for v in deferred.like.values())  # the layout holds no values
    state = aggregators.ServerState()
    out = aggregators.aggregate(strategy, global_model=deferred, contributions=iter(ups), state=state)
    assert loads == [1]
    for name in model:
        assert out.model[name].dtype == model[name].dtype
        assert np.array_equal(out.model[name], plain.model[name])


def test_a_deferred_model_that_changed_shape_is_refused() -> None:
    model = {"a": np.zeros((SIZE // 5, 5), np.float32), "b": np.zeros(7, np.float32)}
    deferred = aggregators.Deferred(like=updates.shapes_of(model), load=lambda: {"a": np.zeros(3, np.float32)})
    with pytest.raises(Exception, match="changed while the round was folded"):
        aggregators.aggregate(
            strategies.FedAvg(), global_model=deferred, contributions=_updates(1), state=aggregators.ServerState()
        )
