"""Events: validation, the bounded on-device store, windows and aggregations, the processor."""

from __future__ import annotations

import json

import pytest

from tether.agent.stream import processor, records, windows
from tether.agent.stream.eventstore import EventStore
from tether.spec import streams

T0 = 1_700_000_000.0


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def doc(kind="page_view", t=0.0, page="item", **attrs):
    return {"type": kind, "page": page, "ts": T0 + t, "attrs": attrs}


# ---------------------------------------------------------------- validation


def test_a_valid_event_parses_and_defaults_its_time() -> None:
    e = records.parse_event({"type": "add_to_cart", "page": "item", "attrs": {"price": 12.5, "sku": "a"}}, now=T0)
    assert (e.type, e.page, e.ts, dict(e.attrs)) == ("add_to_cart", "item", T0, {"price": 12.5, "sku": "a"})


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("page_view", "must be a JSON object"),
        ({"page": "x", "ts": T0}, "type: is required"),
        ({"type": "", "ts": T0}, "type"),
        ({"type": "a b", "ts": T0}, "type: 'a b' must match"),
        ({"type": "a", "ts": "now"}, "ts: must be a finite number"),
        ({"type": "a", "ts": float("nan")}, "ts: must be a finite number"),
        ({"type": "a", "ts": T0 * 1000}, "not a plausible POSIX time"),
        ({"type": "a", "ts": T0, "attrs": [1]}, "attrs: must be an object"),
        ({"type": "a", "ts": T0, "attrs": {"x": {"nested": 1}}}, "attrs.x: must be a string, number or boolean"),
        ({"type": "a", "ts": T0, "attrs": {"x": float("inf")}}, "attrs.x: must be finite"),
        ({"type": "a", "ts": T0, "attrs": {"1x": 1}}, "attribute name"),
        ({"type": "a", "ts": T0, "attrs": {f"k{i}": i for i in range(40)}}, "40 attributes"),
        ({"type": "a", "ts": T0, "attrs": {"s": "x" * 300}}, "attrs.s: longer than 256"),
        ({"type": "a", "ts": T0, "colour": "red"}, "unknown fields"),
    ],
)
def test_malformed_events_get_a_clear_error(bad, message) -> None:
    with pytest.raises(records.InvalidEvent, match=message):
        records.parse_event(bad, now=T0)


# ---------------------------------------------------------------- the store


def test_store_keeps_order_and_numbers_and_applies_count_retention(tmp_path) -> None:
    store = EventStore(tmp_path / "records.db", max_events=5, clock=Clock(T0 + 10))
    seqs = store.append([records.parse_event(doc(t=i, n=i)) for i in range(3)])
    seqs += store.append([records.parse_event(doc(t=3 + i, n=3 + i)) for i in range(4)])
    assert seqs == list(range(1, 8))
    assert store.count() == 5 and store.expired == 2
    assert [e.attrs["n"] for e in store.query()] == [2, 3, 4, 5, 6]
    assert [e.attrs["n"] for e in store.get([7, 1, 3])] == [6, 2]  # 1 expired
    store.close()
    reopened = EventStore(tmp_path / "records.db", max_events=5, clock=Clock(T0 + 10))
    assert reopened.append([records.parse_event(doc(t=9))]) == [8]  # numbers are never reused


def test_store_applies_age_retention_with_an_injected_clock(tmp_path) -> None:
    clock = Clock(T0)
    store = EventStore(tmp_path / "e.db", max_age_s=60, clock=clock)
    store.append([records.parse_event(doc(t=0)), records.parse_event(doc(t=30))])
    clock.t = T0 + 75
    assert store.expire() == 1 and store.count() == 1
    clock.t = T0 + 200
    store.append([records.parse_event(doc(t=190))])
    assert [e.ts for e in store.query()] == [T0 + 190]


def test_store_queries_time_windows_types_and_limits(tmp_path) -> None:
    store = EventStore(tmp_path / "e.db", clock=Clock(T0 + 100))
    store.append([records.parse_event(doc("page_view" if i % 2 else "click", t=i)) for i in range(10)])
    assert [e.ts - T0 for e in store.query(since=T0 + 5, until=T0 + 8)] == [6, 7, 8]
    assert [e.ts - T0 for e in store.query(limit=3)] == [7, 8, 9]
    assert [e.ts - T0 for e in store.query(types=["click"], limit=2)] == [6, 8]


# ---------------------------------------------------------------- windows and aggregations


def test_windows_select_by_time_count_and_type() -> None:
    evs = [records.parse_event(doc("page_view" if i % 3 else "click", t=i)) for i in range(20)]
    now = T0 + 19
    assert len(streams.WindowSpec.from_json({"seconds": 5}).select(evs, now=now)) == 5
    assert [e.ts - T0 for e in streams.WindowSpec.from_json({"count": 2}).select(evs, now=now)] == [18, 19]
    both = streams.WindowSpec.from_json({"seconds": 10, "count": 100, "types": ["click"]}).select(evs, now=now)
    assert [e.ts - T0 for e in both] == [12, 15, 18]


def test_per_key_aggregations() -> None:
    evs = [
        records.parse_event(doc(page="home", dwell_ms=100)),
        records.parse_event(doc(page="home", dwell_ms=300)),
        records.parse_event(doc(page="item", dwell_ms=50)),
        records.parse_event(doc(page="item", dwell_ms="n/a")),
        records.parse_event(doc(page="", dwell_ms=1)),  # no page: not grouped
    ]
    (spec,) = streams.parse_aggregates({"by": "page", "value": "dwell_ms", "ops": ["count", "sum", "mean", "max"]})
    assert windows.aggregate(evs, spec) == {
        "home": {"count": 2, "sum": 400, "mean": 200, "max": 300},
        "item": {"count": 2, "sum": 50, "mean": 50, "max": 50},
    }


@pytest.mark.parametrize(
    ("window", "aggregate", "message"),
    [
        ({}, None, "needs seconds, count or both"),
        ({"seconds": -1}, None, "window.seconds"),
        ({"count": 10**6}, None, "window.count"),
        ({"seconds": 5}, {"by": "page", "ops": ["sum"]}, "need a value attribute"),
        ({"seconds": 5}, {"by": "page", "ops": ["median"]}, "ops"),
        ({"seconds": 5}, [{"by": "page"}, {"by": "page"}], "names must be unique"),
    ],
)
def test_malformed_windows_are_refused(window, aggregate, message) -> None:
    trigger = {"window": window} | ({"aggregate": aggregate} if aggregate is not None else {})
    with pytest.raises(streams.InvalidWindow, match=message):
        streams.StreamSpec.from_trigger(trigger, require_pattern=False)


# ---------------------------------------------------------------- the processor


def test_processor_counts_bad_events_stores_good_ones_and_fires_patterns(tmp_path) -> None:
    clock = Clock(T0 + 100)
    fired: list[tuple[str, processor.Fire]] = []
    proc = processor.StreamProcessor(
        EventStore(tmp_path / "e.db", clock=clock), clock=clock, on_match=lambda o, f: fired.append((o, f))
    )
    spec = streams.StreamSpec.from_trigger(
        {
            "pattern": {"steps": [{"type": "page_view"}, {"type": "add_to_cart"}], "within": 30},
            "window": {"seconds": 60},
            "aggregate": {"name": "views", "by": "page"},
            "cooldownSeconds": 20,
        },
        require_pattern=True,
    )
    proc.register("ns/cart", spec)
    result = proc.ingest(
        [doc(t=0), {"type": 42}, "junk", doc("add_to_cart", t=5), doc("add_to_cart", t=10), doc("add_to_cart", t=40)]
    )
    assert (result.accepted, result.rejected, result.matched) == (4, 2, 1)  # t=10 is in the cooldown
    assert result.errors[0].startswith("[1] type") and "[2]" in result.errors[1]
    ((owner, fire),) = fired
    assert owner == "ns/cart" and [e.type for e in fire.events] == ["page_view", "add_to_cart"]
    inputs = proc.inputs_for(spec, now=fire.match.end, fire=fire)
    assert inputs["match"]["start"] == T0 and inputs["match"]["end"] == T0 + 5
    assert len(inputs["events"]) == 2 and inputs["aggregates"] == {"views": {"item": {"count": 2}}}
    json.dumps(inputs)  # task inputs are JSON
    assert proc.stats()["rejected"] == 2 and proc.stats()["patterns"] == 1
    proc.unregister("ns/cart")
    assert proc.ingest([doc(t=50), doc("add_to_cart", t=51)]).matched == 0


def test_a_broken_consumer_does_not_stop_ingestion(tmp_path) -> None:
    def boom(owner, fire):
        raise RuntimeError("consumer bug")

    proc = processor.StreamProcessor(EventStore(tmp_path / "e.db"), on_match=boom)
    proc.register("x", streams.StreamSpec.from_trigger({"pattern": {"steps": [{"type": "a"}]}}, require_pattern=True))
    assert proc.ingest([{"type": "a", "ts": T0}, {"type": "a", "ts": T0 + 1}]).matched == 2


def test_event_time_for_matching_never_goes_backwards(tmp_path) -> None:
    clock = Clock(T0 + 100)
    proc = processor.StreamProcessor(EventStore(tmp_path / "e.db", clock=clock), clock=clock)
    spec = {"pattern": {"steps": [{"type": "a"}, {"type": "b"}], "within": 5}}
    proc.register("x", streams.StreamSpec.from_trigger(spec, require_pattern=True))
    # "b" is stamped before "a" (a skewed app clock): it is matched at a's time, and stored with its own.
    assert proc.ingest([doc("a", t=100), doc("b", t=50)]).matched == 1
    assert [e.ts - T0 for e in proc.store.query()] == [100, 50]
