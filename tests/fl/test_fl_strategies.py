"""Strategies against NumPy (and SciPy) references, with hypothesis drawing the rounds."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.controller.fl import aggregators, robust, updates
from tether.spec import strategies

SHAPES = {"b": (3,), "w": (2, 3)}


@st.composite
def rounds(draw, *, min_updates: int = 1, max_updates: int = 9):
    """A global model and a round of updates from distinct devices, float64, moderate values."""
    n = draw(st.integers(min_updates, max_updates))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    global_model = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    ups = [
        updates.Update(
            device=f"dev-{i:03d}",
            delta={k: rng.normal(scale=draw(st.sampled_from([0.01, 1.0, 10.0])), size=s) for k, s in SHAPES.items()},
            samples=int(rng.integers(1, 500)),
        )
        for i in range(n)
    ]
    return global_model, ups


def stack(ups, name):
    return np.stack([u.delta[name] for u in ups])


def weights(ups):
    return np.array([u.samples for u in ups], dtype=float)


def close(a, b):
    for k in SHAPES:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-10, atol=1e-10)


FOLDING = [strategies.FedAvg(), strategies.FedProx(proximal_mu=0.01)]


@pytest.mark.parametrize("strategy", FOLDING, ids=lambda s: s.name.value)
@settings(deadline=None)  # no timing: a loaded CI machine must not fail a property
@given(case=rounds())
def test_fedavg_and_fedprox_are_the_sample_weighted_mean(strategy, case) -> None:
    g, ups = case
    out = aggregators.aggregate(strategy, global_model=g, contributions=ups, state=aggregators.ServerState())
    ref = {k: g[k] + np.average(stack(ups, k), axis=0, weights=weights(ups)) for k in SHAPES}
    close(out.model, ref)
    assert out.samples == sum(u.samples for u in ups)
    assert out.devices == tuple(u.device for u in ups)
    assert out.state.rounds == 1


@settings(deadline=None)  # no timing: a loaded CI machine must not fail a property
@given(case=rounds(), lr=st.floats(0.1, 2.0), beta=st.floats(0.0, 0.99))
def test_fedavgm_applies_server_momentum_over_rounds(case, lr, beta) -> None:
    g, ups = case
    strategy = strategies.FedAvgM(server_learning_rate=lr, momentum=beta)
    state = aggregators.ServerState()
    ref_w = {k: g[k].copy() for k in SHAPES}
    ref_v = {k: np.zeros(s) for k, s in SHAPES.items()}
    model = g
    for r in range(3):  # the same updates three rounds running: the velocity builds up
        out = aggregators.aggregate(strategy, global_model=model, contributions=ups, state=state)
        model, state = out.model, out.state
        for k in SHAPES:
            mean = np.average(stack(ups, k), axis=0, weights=weights(ups))
            ref_v[k] = beta * ref_v[k] + mean
            ref_w[k] = ref_w[k] + lr * ref_v[k]
        close(model, ref_w)
        assert state.rounds == r + 1


def _fedopt_reference(opt, ups_per_round, g, *, lr, b1, b2, tau):
    w = {k: g[k].copy() for k in SHAPES}
    m = {k: np.zeros(s) for k, s in SHAPES.items()}
    v = {k: np.full(s, tau**2) for k, s in SHAPES.items()}
    for ups in ups_per_round:
        for k in SHAPES:
            d = np.average(stack(ups, k), axis=0, weights=weights(ups))
            m[k] = b1 * m[k] + (1 - b1) * d
            if opt == "adagrad":
                v[k] = v[k] + d**2
            elif opt == "yogi":
                v[k] = v[k] - (1 - b2) * d**2 * np.sign(v[k] - d**2)
            else:
                v[k] = b2 * v[k] + (1 - b2) * d**2
            w[k] = w[k] + lr * m[k] / (np.sqrt(v[k]) + tau)
    return w


@pytest.mark.parametrize("opt", list(strategies.ServerOptimizer))
@settings(deadline=None)  # no timing: a loaded CI machine must not fail a property
@given(first=rounds(), second=rounds(), lr=st.floats(0.001, 1.0), tau=st.floats(1e-6, 0.1))
def test_server_optimizers_follow_reddi_et_al(opt, first, second, lr, tau) -> None:
    g, ups1 = first
    _, ups2 = second
    strategy = strategies.FedOpt(optimizer=opt, server_learning_rate=lr, beta1=0.9, beta2=0.99, tau=tau)
    state = aggregators.ServerState()
    model = g
    for ups in (ups1, ups2):
        out = aggregators.aggregate(strategy, global_model=model, contributions=ups, state=state)
        model, state = out.model, out.state
    ref = _fedopt_reference(opt.value, [ups1, ups2], g, lr=lr, b1=0.9, b2=0.99, tau=tau)
    close(model, ref)
    assert strategy.name.value == {"adam": "fedAdam", "yogi": "fedYogi", "adagrad": "fedAdagrad"}[opt.value]


@settings(deadline=None)  # no timing: a loaded CI machine must not fail a property
@given(case=rounds())
def test_median_is_numpys_coordinate_wise_median(case) -> None:
    g, ups = case
    out = aggregators.aggregate(strategies.Median(), global_model=g, contributions=ups, state=aggregators.ServerState())
    close(out.model, {k: g[k] + np.median(stack(ups, k), axis=0) for k in SHAPES})


@settings(deadline=None)  # no timing: a loaded CI machine must not fail a property
@given(case=rounds(), fraction=st.floats(0.0, 0.49))
def test_trimmed_mean_is_scipys_trim_mean(case, fraction) -> None:
    g, ups = case
    strategy = strategies.TrimmedMean(trim_fraction=fraction)
    out = aggregators.aggregate(strategy, global_model=g, contributions=ups, state=aggregators.ServerState())
    close(out.model, {k: g[k] + scipy.stats.trim_mean(stack(ups, k), fraction, axis=0) for k in SHAPES})


def _krum_reference(ups, f, m):
    flat = [np.concatenate([u.delta[k].ravel() for k in sorted(SHAPES)]) for u in ups]
    n = len(ups)
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    best = sorted(range(n), key=lambda i: (scores[i], i))[:m]
    picked = [ups[i] for i in best]
    return picked, {k: np.average(stack(picked, k), axis=0, weights=weights(picked)) for k in SHAPES}


@settings(deadline=None)  # no timing: a loaded CI machine must not fail a property
@given(case=rounds(min_updates=5, max_updates=12), data=st.data())
def test_krum_and_multi_krum_match_a_brute_force_reference(case, data) -> None:
    g, ups = case
    f = data.draw(st.integers(0, (len(ups) - 3) // 2))
    m = data.draw(st.integers(1, len(ups)))
    strategy = strategies.Krum(byzantine=f, selected=m)
    out = aggregators.aggregate(strategy, global_model=g, contributions=ups, state=aggregators.ServerState())
    picked, mean = _krum_reference(ups, f, m)
    scores = robust.krum_scores(ups, byzantine=f)
    # Ties within rounding could pick a different but equally scored update: compare scores, then the result.
    assert sorted(scores[[ups.index(p) for p in picked]]) == pytest.approx(
        sorted(scores[[int(d.split("-")[1]) for d in out.chosen]]), rel=1e-9
    )
    if set(out.chosen) == {p.device for p in picked}:
        close(out.model, {k: g[k] + mean[k] for k in SHAPES})


@pytest.mark.parametrize(
    "strategy",
    [strategies.Median(), strategies.TrimmedMean(trim_fraction=0.2), strategies.Krum(byzantine=1, selected=1)],
    ids=lambda s: s.name.value,
)
@settings(deadline=None)  # no timing: a loaded CI machine must not fail a property
@given(case=rounds(min_updates=5), seed=st.integers(0, 1000))
def test_robust_results_do_not_depend_on_the_order(strategy, case, seed) -> None:
    g, ups = case
    shuffled = list(ups)
    np.random.default_rng(seed).shuffle(shuffled)
    a = aggregators.aggregate(strategy, global_model=g, contributions=ups, state=aggregators.ServerState())
    b = aggregators.aggregate(strategy, global_model=g, contributions=shuffled, state=aggregators.ServerState())
    close(a.model, b.model)


@settings(deadline=None)  # no timing: a loaded CI machine must not fail a property
@given(case=rounds())
def test_a_fold_in_a_fixed_order_is_bit_for_bit_reproducible(case) -> None:
    g, ups = case
    strategy = strategies.FedAvg()
    ordered = sorted(ups, key=lambda u: u.device)
    a = aggregators.aggregate(strategy, global_model=g, contributions=iter(ordered), state=aggregators.ServerState())
    b = aggregators.aggregate(strategy, global_model=g, contributions=list(ordered), state=aggregators.ServerState())
    for k in SHAPES:
        assert a.model[k].tobytes() == b.model[k].tobytes()


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(8, 12))
def test_robust_strategies_resist_one_poisoned_update(seed, n) -> None:
    """Honest devices of one data distribution; one sends its update scaled by -100 (sign-flipped)."""
    rng = np.random.default_rng(seed)
    g = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    ups = [
        updates.Update(device=f"dev-{i:03d}", delta={k: rng.normal(size=s) for k, s in SHAPES.items()}, samples=10)
        for i in range(n)
    ]
    bad = ups[0]
    poisoned = [updates.Update(device=bad.device, delta={k: -100.0 * v for k, v in bad.delta.items()}, samples=10)]
    poisoned += ups[1:]
    honest = ups[1:]
    lo = {k: stack(honest, k).min(axis=0) for k in SHAPES}
    hi = {k: stack(honest, k).max(axis=0) for k in SHAPES}
    for strategy in (
        strategies.Median(),
        strategies.TrimmedMean(trim_fraction=0.15),  # trims one value from each end for 8 to 12 updates
        strategies.Krum(byzantine=1),
        strategies.Krum(byzantine=1, selected=3),
    ):
        out = aggregators.aggregate(strategy, global_model=g, contributions=poisoned, state=aggregators.ServerState())
        for k in SHAPES:
            assert np.all(out.delta[k] >= lo[k] - 1e-9) and np.all(out.delta[k] <= hi[k] + 1e-9), strategy
        assert bad.device not in out.chosen or not isinstance(strategy, strategies.Krum)
    # FedAvg takes the poison in: the mean moves far outside what any honest device sent.
    avg = aggregators.aggregate(
        strategies.FedAvg(), global_model=g, contributions=poisoned, state=aggregators.ServerState()
    )
    assert any(np.any(avg.delta[k] < lo[k]) or np.any(avg.delta[k] > hi[k]) for k in SHAPES)


def test_the_new_model_keeps_the_global_dtype_and_state_stays_float64() -> None:
    g = {"w": np.ones(4, dtype=np.float32)}
    ups = [updates.Update(device="a", delta={"w": np.full(4, 0.5, dtype=np.float32)}, samples=2)]
    out = aggregators.aggregate(
        strategies.FedOpt(optimizer=strategies.ServerOptimizer.ADAM),
        global_model=g,
        contributions=ups,
        state=aggregators.ServerState(),
    )
    assert out.model["w"].dtype == np.float32
    assert out.state.velocity is not None and out.state.velocity["w"].dtype == np.float64


def test_the_fold_keeps_one_model_of_memory_and_refuses_a_device_twice() -> None:
    g = {"w": np.zeros(3)}
    fold = aggregators.MeanFold(like=g)
    fold.add(updates.Update(device="a", delta={"w": np.ones(3)}, samples=1))
    with pytest.raises(updates.InvalidUpdate, match="already folded") as e:
        fold.add(updates.Update(device="a", delta={"w": np.ones(3)}, samples=1))
    assert e.value.field == "device"
    fold.add(updates.Update(device="b", delta={"w": np.full(3, 3.0)}, samples=3))
    np.testing.assert_array_equal(fold.mean()["w"], np.full(3, 2.5))
    assert fold.devices == ("a", "b") and fold.samples == 4


@pytest.mark.parametrize(
    ("delta", "samples", "field", "words"),
    [
        ({"w": np.ones(3)}, 0, "samples", "positive integer"),
        ({}, 1, "delta", "missing tensors ['w']"),
        ({"w": np.ones(3), "x": np.ones(1)}, 1, "delta", "does not have: ['x']"),
        ({"w": np.ones(4)}, 1, "delta['w']", "shape [4]"),
        ({"w": np.ones(3, dtype=np.int32)}, 1, "delta['w']", "floating-point"),
        ({"w": np.ones(3, dtype=np.float32)}, 1, "delta['w']", "dtype float32, the model's is float64"),
        ({"w": np.array([1e299, 0.0, 0.0])}, 20, "delta['w']", "too large to fold"),
        ({"w": np.array([1.0, np.nan, 0.0])}, 1, "delta['w']", "NaN"),
        ({"w": np.array([1.0, np.inf, 0.0])}, 1, "delta['w']", "infinite"),
    ],
)
def test_a_bad_update_is_refused_whole_with_its_field(delta, samples, field, words) -> None:
    g = {"w": np.zeros(3)}
    fold = aggregators.MeanFold(like=g)
    fold.add(updates.Update(device="good", delta={"w": np.ones(3)}, samples=1))
    with pytest.raises(updates.InvalidUpdate) as e:
        fold.add(updates.Update(device="bad", delta=delta, samples=samples))
    assert e.value.field == field and words in str(e.value) and "bad" in str(e.value)
    np.testing.assert_array_equal(fold.mean()["w"], np.ones(3))  # nothing of it folded
    assert fold.devices == ("good",)


def test_an_empty_round_or_too_few_for_krum_is_refused() -> None:
    g = {"w": np.zeros(2)}
    for strategy in (strategies.FedAvg(), strategies.Median()):
        with pytest.raises(updates.EmptyRound):
            aggregators.aggregate(strategy, global_model=g, contributions=[], state=aggregators.ServerState())
    ups = [updates.Update(device=str(i), delta={"w": np.ones(2)}, samples=1) for i in range(4)]
    with pytest.raises(updates.EmptyRound, match="at least 5"):
        aggregators.aggregate(
            strategies.Krum(byzantine=1), global_model=g, contributions=ups, state=aggregators.ServerState()
        )
