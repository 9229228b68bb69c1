"""Pure aggregation maths: decoding, rules, rejection, and the incremental fold's laws."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.common import errors
from tether.controller import aggregation as agg
from tether.controller.aggregation import Accumulator, AggregationSpec, RawResult


def raw(rid: int, *, device: str = "d", samples: int = 1, metrics=None, counts=None, **tensors) -> RawResult:
    return RawResult(
        result_id=rid,
        device_id=device,
        sample_count=samples,
        metrics=metrics or {},
        counts=counts or {},
        tensors=[agg.encode_tensor(name, np.asarray(v, dtype=np.float64)) for name, v in tensors.items()],
    )


def canonical(body: dict) -> str:
    return json.dumps(body, sort_keys=True, allow_nan=False)


# --------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (1, 2, 3, 1)])
def test_tensor_round_trip_is_bit_exact(shape):
    x = np.random.default_rng(0).normal(size=shape)
    name, y = agg.decode_tensor(agg.encode_tensor("t", x))
    assert name == "t" and y.shape == x.shape and y.tobytes() == x.tobytes()


def test_encoding_is_float64_little_endian():
    assert base64.b64decode(agg.encode_tensor("t", np.array([1.0]))["data"]) == np.array([1.0], "<f8").tobytes()


@pytest.mark.parametrize(
    ("tensor", "needle"),
    [
        ({"name": "w", "shape": [2], "data": "!!!"}, "base64"),
        ({"name": "w", "shape": [3], "data": agg.encode_array(np.zeros(2))}, "bytes do not hold"),
        ({"name": "w", "shape": [-1], "data": ""}, "non-negative"),
        ({"name": "w", "shape": [True], "data": ""}, "non-negative"),
        ({"name": "w", "shape": "2", "data": ""}, "list"),
        ({"name": "", "shape": [1], "data": agg.encode_array(np.zeros(1))}, "name"),
        ({"name": "w", "shape": [1 << 20, 1 << 20], "data": ""}, "limit"),
        ({"name": "w", "shape": [1], "data": 5}, "base64 string"),
        ("w", "object"),
    ],
)
def test_malformed_tensors_raise_invalid_tensor(tensor, needle):
    with pytest.raises(agg.InvalidTensor, match=needle) as e:
        agg.decode_tensors([tensor])
    assert isinstance(e.value, errors.InvalidArgument)


def test_duplicate_tensor_names_are_refused():
    t = agg.encode_tensor("w", np.zeros(2))
    with pytest.raises(agg.InvalidTensor, match="twice"):
        agg.decode_tensors([t, t])


# --------------------------------------------------------------------------- spec


def test_spec_defaults_and_parsing():
    assert AggregationSpec.from_json({}) == AggregationSpec.from_json(None) == AggregationSpec()
    spec = AggregationSpec.from_json({"tensors": "sum", "metrics": "mean"})
    assert spec.to_json() == {"tensors": "sum", "metrics": "mean", "counts": "sum"}


@pytest.mark.parametrize(
    ("obj", "field"),
    [({"tensors": "median"}, "aggregation.tensors"), ({"metrics": "sum"}, "aggregation.metrics"), ({"x": 1}, "")],
)
def test_bad_spec_is_a_typed_error(obj, field):
    with pytest.raises(errors.InvalidSpec) as e:
        AggregationSpec.from_json(obj)
    assert e.value.field.startswith(field or "aggregation")


# --------------------------------------------------------------------------- rules


def test_rules_on_a_small_example():
    results = [
        raw(1, device="a", samples=1, metrics={"loss": 1.0}, counts={"n": 2}, w=[1.0, 2.0]),
        raw(2, device="b", samples=3, metrics={"loss": 3.0}, counts={"n": 5}, w=[5.0, 6.0]),
        raw(3, device="a", samples=0, metrics={"loss": 100.0}, counts={"n": 1}, w=[9.0, 9.0]),
    ]
    acc = Accumulator()
    assert acc.add_all(results) == []
    body = acc.finish()
    assert body["results"] == 3 and body["devices"] == 2 and body["samples"] == 4
    assert body["counts"] == {"n": 8}
    assert body["metrics"] == {"loss": pytest.approx((1 * 1 + 3 * 3) / 4)}
    assert body["tensors"]["w"] == {"shape": [2], "values": pytest.approx([4.0, 5.0])}
    mean = acc.finish(AggregationSpec(tensors=agg.TensorRule.MEAN, metrics=agg.MetricRule.MEAN))
    assert mean["tensors"]["w"]["values"] == pytest.approx([5.0, 17 / 3])
    assert mean["metrics"]["loss"] == pytest.approx(104 / 3)
    assert acc.finish(AggregationSpec(tensors=agg.TensorRule.SUM))["tensors"]["w"]["values"] == [15.0, 17.0]


def test_weighted_mean_with_no_samples_falls_back_to_the_plain_mean():
    acc = Accumulator()
    acc.add_all([raw(1, samples=0, metrics={"m": 1.0}, w=[2.0]), raw(2, samples=0, metrics={"m": 3.0}, w=[4.0])])
    body = acc.finish()
    assert body["tensors"]["w"]["values"] == [3.0] and body["metrics"]["m"] == 2.0


def test_empty_accumulator_has_the_contract_shape():
    body = Accumulator().finish()
    assert {k: body[k] for k in ("results", "devices", "samples", "metrics", "tensors", "counts")} == {
        "results": 0, "devices": 0, "samples": 0, "metrics": {}, "tensors": {}, "counts": {},
    }  # fmt: skip
    assert body["rejected"] == 0


def test_tensors_and_metrics_missing_from_some_results_are_averaged_over_those_that_have_them():
    acc = Accumulator()
    acc.add_all([raw(1, samples=2, w=[2.0]), raw(2, samples=1, metrics={"m": 5.0}), raw(3, samples=2, w=[4.0])])
    body = acc.finish()
    assert body["tensors"]["w"]["values"] == [3.0] and body["metrics"] == {"m": 5.0} and body["results"] == 3


# --------------------------------------------------------------------------- rejection


def test_shape_mismatch_excludes_that_result_and_reports_it():
    acc = Accumulator()
    good = [raw(1, device="a", samples=2, counts={"n": 1}, w=[1.0, 1.0]), raw(3, device="c", samples=2, w=[3.0, 3.0])]
    bad = raw(2, device="b", samples=100, counts={"n": 50}, metrics={"loss": 9.0}, w=[[7.0, 7.0]])
    assert acc.add(good[0]) is None
    rejection = acc.add(bad)
    assert acc.add(good[1]) is None
    assert rejection is not None
    assert (rejection.result_id, rejection.device_id, rejection.reason, rejection.field) == (
        2, "b", "ShapeMismatch", "tensors.w",
    )  # fmt: skip
    assert "[1, 2]" in rejection.message and "[2]" in rejection.message
    body = acc.finish()
    assert body["results"] == 2 and body["devices"] == 2 and body["samples"] == 4
    assert body["counts"] == {"n": 1} and body["metrics"] == {}  # nothing of the bad result leaked in
    assert body["tensors"]["w"]["values"] == [2.0, 2.0]
    assert body["rejected"] == 1 and body["rejections"][0]["reason"] == "ShapeMismatch"


def test_shape_mismatch_error_names_the_tensor():
    acc = Accumulator()
    acc.add(raw(1, w=[1.0]))
    with pytest.raises(agg.ShapeMismatch) as e:
        acc._tensor_updates(agg.decode_result(raw(2, w=[1.0, 2.0])))
    assert e.value.name == "w" and e.value.expected == (1,) and e.value.got == (2,)


@pytest.mark.parametrize(
    ("result", "reason", "field"),
    [
        (raw(9, w=[1.0, float("nan")]), "NonFinite", "tensors.w"),
        (raw(9, w=[float("inf"), 1.0]), "NonFinite", "tensors.w"),
        (raw(9, metrics={"loss": float("nan")}, w=[1.0, 1.0]), "NonFinite", "metrics.loss"),
        (raw(9, samples=2, w=[1e308, 1.0]), "NonFinite", "tensors.w"),  # 2·1e308 overflows the weighted sum
        (raw(9, metrics={"loss": "high"}), "InvalidResult", "metrics.loss"),
        (raw(9, counts={"n": 1.5}), "InvalidResult", "counts.n"),
        (raw(9, counts={"n": True}), "InvalidResult", "counts.n"),
        (RawResult(result_id=9, device_id="d", sample_count=-1), "InvalidResult", "sample_count"),
        (RawResult(result_id=9, device_id="d", sample_count=1, tensors={"w": 1}), "InvalidTensor", "tensors"),
    ],
)
def test_bad_results_are_rejected_whole_and_change_nothing(result, reason, field):
    acc = Accumulator()
    acc.add(raw(1, samples=1, metrics={"loss": 1.0}, counts={"n": 1}, w=[1.0, 1.0]))
    before = canonical(acc.finish())
    rejection = acc.add(result)
    assert rejection is not None and (rejection.reason, rejection.field) == (reason, field)
    after = acc.finish()
    assert after.pop("rejected") == 1 and len(after.pop("rejections")) == 1
    expected = json.loads(before)
    expected.pop("rejected"), expected.pop("rejections")
    assert canonical(after) == canonical(expected)


def test_the_body_is_strict_json():
    acc = Accumulator()
    acc.add_all([raw(1, samples=3, metrics={"m": 1e300}, w=[1e300]), raw(2, samples=1, metrics={"m": -1e300}, w=[1.0])])
    json.dumps(acc.finish(), allow_nan=False)


def test_rejections_listed_are_capped_but_all_counted():
    acc = Accumulator()
    acc.add(raw(0, w=[1.0]))
    for i in range(agg.MAX_REJECTIONS_REPORTED + 7):
        acc.add(raw(i + 1, w=[1.0, 2.0]))
    body = acc.finish()
    assert body["rejected"] == agg.MAX_REJECTIONS_REPORTED + 7
    assert len(body["rejections"]) == agg.MAX_REJECTIONS_REPORTED


def test_corrupt_state_is_a_typed_error():
    with pytest.raises(agg.InvalidState):
        Accumulator.from_state({"format": 1, "results": 1})
    with pytest.raises(agg.InvalidState):
        Accumulator.from_state({"format": 99})


# --------------------------------------------------------------------------- laws (property tests)

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def result_lists(draw, *, max_size: int = 12, allow_bad: bool = True):
    shape = draw(st.sampled_from([(), (1,), (3,), (2, 2)]))
    size = int(np.prod(shape))
    n = draw(st.integers(min_value=0, max_value=max_size))
    out = []
    for i in range(n):
        tensor_shape = shape
        if allow_bad and draw(st.integers(0, 9)) == 0:
            tensor_shape = (*shape, 2)  # a mismatching upload
        values = draw(st.lists(finite, min_size=int(np.prod(tensor_shape)), max_size=int(np.prod(tensor_shape))))
        tensors = {"w": np.array(values, dtype=np.float64).reshape(tensor_shape)}
        if draw(st.booleans()):
            tensors["b"] = np.array(draw(st.lists(finite, min_size=size, max_size=size))).reshape(shape)
        metrics = {"loss": draw(finite)} if draw(st.booleans()) else {}
        out.append(
            raw(
                i + 1,
                device=f"dev-{draw(st.integers(0, 4))}",
                samples=draw(st.integers(0, 1000)),
                metrics=metrics,
                counts={"n": draw(st.integers(-5, 1000))},
                **tensors,
            )
        )
    return out


def fold(results, acc=None):
    acc = acc or Accumulator()
    acc.add_all(results)
    return acc


def through_json(acc: Accumulator) -> Accumulator:
    return Accumulator.from_state(json.loads(json.dumps(acc.to_state(), allow_nan=False)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    results=result_lists(),
    cuts=st.lists(st.integers(0, 12), max_size=4),
    spec=st.sampled_from(["weightedMean", "mean", "sum"]),
)
def test_incremental_fold_with_stored_state_equals_the_batch_bit_for_bit(results, cuts, spec):
    spec = AggregationSpec.from_json({"tensors": spec})
    batch = agg.aggregate(results, spec)
    acc = Accumulator()
    start = 0
    for cut in [*sorted({min(c, len(results)) for c in cuts}), len(results)]:
        acc = fold(results[start:cut], through_json(acc))  # every round re-reads the stored state
        start = cut
    assert canonical(acc.finish(spec)) == canonical(batch)


@settings(max_examples=60, deadline=None)
@given(results=result_lists(allow_bad=False))
def test_weighted_mean_equals_numpy_average(results):
    decoded = [agg.decode_result(r) for r in results]
    body = agg.aggregate(results)
    with_w = [r for r in decoded if "w" in r.tensors]
    if not with_w:
        assert "w" not in body["tensors"]
        return
    stack = np.stack([r.tensors["w"] for r in with_w])
    weights = np.array([r.sample_count for r in with_w], dtype=np.float64)
    want = np.average(stack, axis=0, weights=weights) if weights.sum() > 0 else stack.mean(axis=0)
    got = np.array(body["tensors"]["w"]["values"]).reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * max(1.0, float(np.abs(stack).max())))
    assert body["samples"] == sum(r.sample_count for r in decoded)
    assert body["counts"] == ({"n": sum(r.counts["n"] for r in decoded)} if decoded else {})
    assert body["devices"] == len({r.device_id for r in decoded})


def assert_accumulators_close(a: Accumulator, b: Accumulator) -> None:
    exact = ("results", "samples", "devices", "counts", "rejected")
    assert {k: getattr(a, k) for k in exact} == {k: getattr(b, k) for k in exact}
    assert a.metrics.keys() == b.metrics.keys() and a.tensors.keys() == b.tensors.keys()
    for name in a.metrics:
        ma, mb = a.metrics[name], b.metrics[name]
        assert (ma.n, ma.weight) == (mb.n, mb.weight)
        assert ma.weighted == pytest.approx(mb.weighted, rel=1e-9, abs=1e-3)
        assert ma.plain == pytest.approx(mb.plain, rel=1e-9, abs=1e-6)
    for name in a.tensors:
        ta, tb = a.tensors[name], b.tensors[name]
        assert (ta.shape, ta.n, ta.weight) == (tb.shape, tb.n, tb.weight)
        np.testing.assert_allclose(ta.weighted, tb.weighted, rtol=1e-9, atol=1e-3)
        np.testing.assert_allclose(ta.plain, tb.plain, rtol=1e-9, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(results=result_lists(allow_bad=False, max_size=15), i=st.integers(0, 15), j=st.integers(0, 15))
def test_merge_is_associative_and_agrees_with_the_sequential_fold(results, i, j):
    i, j = sorted((min(i, len(results)), min(j, len(results))))
    a, b, c = fold(results[:i]), fold(results[i:j]), fold(results[j:])
    left, right = a.merge(b).merge(c), a.merge(b.merge(c))
    assert_accumulators_close(left, right)
    assert_accumulators_close(left, fold(results))
    # the empty accumulator is an exact identity
    assert canonical(a.merge(Accumulator()).finish()) == canonical(a.finish())
    assert canonical(Accumulator().merge(a).finish()) == canonical(a.finish())


def test_merge_refuses_shapes_that_disagree():
    with pytest.raises(agg.ShapeMismatch):
        fold([raw(1, w=[1.0])]).merge(fold([raw(2, w=[1.0, 2.0])]))
