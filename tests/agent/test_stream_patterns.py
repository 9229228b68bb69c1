"""Pattern specs and matching: the trie agrees with the naive per-pattern scan, and the semantics hold."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.agent.stream import patterns
from tether.agent.stream.records import Event
from tether.spec import streams

T0 = 1_700_000_000.0


def ev(kind: str, t: float, page: str = "p", **attrs) -> Event:
    return Event(type=kind, page=page, ts=T0 + t, attrs=attrs)


def pat(*steps, within: float = 30) -> streams.Pattern:
    return streams.Pattern.from_json(
        {"steps": [s if isinstance(s, dict) else {"type": s} for s in steps], "within": within}
    )


def run_both(registered: dict[str, streams.Pattern], stream: list[Event]) -> list[patterns.Match]:
    trie, naive = patterns.TrieMatcher(), patterns.NaiveMatcher()
    for pid, p in registered.items():
        trie.add(pid, p)
        naive.add(pid, p)
    got, want = patterns.feed_all(trie, stream), patterns.feed_all(naive, stream)
    assert sorted(got, key=repr) == sorted(want, key=repr)
    return got


def test_sequence_within_time_matches_and_reports_the_chain() -> None:
    p = {"cart": pat({"type": "page_view", "page": "item"}, "add_to_cart", within=30)}
    stream = [ev("page_view", 0, "item"), ev("click", 5), ev("add_to_cart", 10), ev("add_to_cart", 45)]
    (m,) = run_both(p, stream)
    assert (m.pattern, m.start, m.end, m.chain) == ("cart", T0, T0 + 10, (0, 2))


def test_too_slow_or_out_of_order_does_not_match() -> None:
    p = {"cart": pat("page_view", "add_to_cart", within=30)}
    assert run_both(p, [ev("page_view", 0), ev("add_to_cart", 30.5)]) == []
    assert run_both(p, [ev("add_to_cart", 0), ev("page_view", 1)]) == []
    assert len(run_both(p, [ev("page_view", 0), ev("add_to_cart", 30)])) == 1  # the bound is inclusive


def test_latest_start_is_reported_and_one_event_advances_one_step() -> None:
    p = {"aab": pat("a", "a", "b", within=100)}
    # A single "a" cannot count for both steps.
    assert run_both(p, [ev("a", 0), ev("b", 1)]) == []
    (m,) = run_both(p, [ev("a", 0), ev("a", 1), ev("a", 2), ev("b", 3)])
    assert m.chain == (1, 2, 3) and m.start == T0 + 1


def test_attribute_conditions() -> None:
    p = {
        "pricey": pat({"type": "add_to_cart", "where": {"price": {"gte": 10}, "currency": "EUR"}}),
        "cat": pat({"type": "add_to_cart", "where": {"cat": {"in": ["shoes", "bags"]}, "promo": {"exists": False}}}),
    }
    stream = [
        ev("add_to_cart", 0, price=12, currency="EUR", cat="shoes"),
        ev("add_to_cart", 1, price=9.5, currency="EUR", cat="bags", promo="x"),
        ev("add_to_cart", 2, price="12", currency="EUR"),  # a string is not a number
        ev("add_to_cart", 3, price=True, currency="EUR"),  # nor is a boolean
    ]
    got = run_both(p, stream)
    assert sorted((m.pattern, m.chain) for m in got) == [("cat", (0,)), ("pricey", (0,))]


def test_shared_prefixes_share_trie_nodes_and_removal_prunes_them() -> None:
    trie = patterns.TrieMatcher()
    trie.add("p1", pat("a", "b", "c"))
    trie.add("p2", pat("a", "b", "d"))
    trie.add("p3", pat("a", "b"))
    assert trie.node_count == 4  # a, a>b, a>b>c, a>b>d
    trie.remove("p1")
    assert trie.node_count == 3
    trie.remove("p2")
    trie.remove("p3")
    assert trie.node_count == 0 and len(trie) == 0
    assert patterns.feed_all(trie, [ev("a", 0), ev("b", 1)]) == []


def test_patterns_with_different_bounds_on_one_prefix() -> None:
    p = {"fast": pat("a", "b", within=5), "slow": pat("a", "b", within=60)}
    got = run_both(p, [ev("a", 0), ev("b", 10)])
    assert [m.pattern for m in got] == ["slow"]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"steps": []}, "steps: must be a list of 1 to 8 steps"),
        ({"steps": [{"type": "a"}] * 9}, "steps: must be a list"),
        ({"steps": [{"page": "x"}]}, r"steps\[0\].type"),
        ({"steps": [{"type": "a", "where": {"x": {"near": 1}}}]}, "operator 'near'"),
        ({"steps": [{"type": "a", "where": {"x": {"gt": "1"}}}]}, "gt takes a finite number"),
        ({"steps": [{"type": "a", "where": {"x": {"in": "abc"}}}]}, "in takes a list"),
        ({"steps": [{"type": "a"}], "within": -1}, "within"),
        ({"steps": [{"type": "a"}], "bogus": 1}, "unknown keys"),
        ([1, 2], "must be an object"),
    ],
)
def test_malformed_patterns_are_refused_with_the_field(doc, message) -> None:
    with pytest.raises(streams.InvalidPattern, match=message):
        streams.Pattern.from_json(doc)


# ---------------------------------------------------------------- property: trie == naive

TYPES = ["a", "b", "c", "d"]
PAGES = ["x", "y"]

steps_st = st.fixed_dictionaries(
    {"type": st.sampled_from(TYPES)},
    optional={
        "page": st.sampled_from(PAGES),
        "where": st.sampled_from([{"v": {"gt": 2}}, {"v": {"lte": 2}}, {"flag": True}, {"v": {"in": [1, 3]}}]),
    },
)
pattern_st = st.builds(
    lambda steps, within: streams.Pattern.from_json({"steps": steps, "within": within}),
    st.lists(steps_st, min_size=1, max_size=4),
    st.sampled_from([0, 1, 3, 10, 50]),
)
event_st = st.builds(
    lambda kind, page, dt, v, flag: (kind, page, dt, {"v": v, "flag": flag}),
    st.sampled_from(TYPES),
    st.sampled_from(PAGES),
    st.sampled_from([0.0, 0.5, 1.0, 2.0, 7.0]),
    st.integers(0, 4),
    st.booleans(),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    registered=st.lists(pattern_st, min_size=1, max_size=12),
    raw=st.lists(event_st, max_size=40),
)
def test_trie_and_naive_scan_find_the_same_matches(registered, raw) -> None:
    stream, t = [], 0.0
    for kind, page, dt, attrs in raw:
        t += dt
        stream.append(Event(type=kind, page=page, ts=T0 + t, attrs=attrs))
    run_both({f"p{i}": p for i, p in enumerate(registered)}, stream)


@settings(max_examples=50, deadline=None)
@given(registered=st.lists(pattern_st, min_size=2, max_size=8), raw=st.lists(event_st, max_size=30))
def test_removing_a_pattern_is_like_never_adding_it(registered, raw) -> None:
    stream, t = [], 0.0
    for kind, page, dt, attrs in raw:
        t += dt
        stream.append(Event(type=kind, page=page, ts=T0 + t, attrs=attrs))
    trie = patterns.TrieMatcher()
    for i, p in enumerate(registered):
        trie.add(f"p{i}", p)
    trie.remove("p0")
    naive = patterns.NaiveMatcher()
    for i, p in enumerate(registered[1:], start=1):
        naive.add(f"p{i}", p)
    assert sorted(patterns.feed_all(trie, stream), key=repr) == sorted(patterns.feed_all(naive, stream), key=repr)
