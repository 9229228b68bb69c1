"""Event-sequence patterns: the spec, a trie matcher, and the naive per-pattern scan (pure).

The spec (`Pattern`, `Step`, `Condition` and their parser) lives in
`tether.spec.streams` so the operator and controller validate patterns
with the same code.

A pattern is an ordered list of steps and a time bound::

    {"steps": [{"type": "page_view", "page": "item"},
               {"type": "add_to_cart", "where": {"price": {"gte": 10}}}],
     "within": 30}

A step names an event `type`, optionally a `page`, and attribute conditions
in `where`: `{"attr": value}` means equality, `{"attr": {"op": value}}` uses
one of `eq`, `ne`, `in`, `notIn`, `gt`, `gte`, `lt`, `lte`, `exists`,
`prefix`. Conditions may also test the event's `key`.

Semantics (what "matches" means, identically in both matchers). Events are
fed in arrival order with non-decreasing times (the stream processor clamps a
clock that goes backwards). Pattern P = (s1..sk, W) *matches at* event e when
e satisfies sk and earlier events satisfy s1..s(k-1) in that order (other
events may come in between) with e.ts - ts(first) <= W. An event advances a
partial match by at most one step. When several first events qualify, the
match reports the latest one, and the most recent chain of events reaching it
(`Match.chain`, their sequence numbers). An event completes a given pattern at
most once; a partial match is not consumed by completing, so a second
add_to_cart within the bound matches again (triggers have a cooldown for that).

Why a trie. Every pattern prefix is a node; patterns sharing a prefix share
its nodes (and its partial-match state). Each node keeps one partial match:
the latest-starting one (a later start satisfies every time bound an earlier
one does, so nothing is lost). An event looks up only the steps its (type,
page) can satisfy, evaluates each such step once however many patterns use
it, and advances the nodes of those steps from their parents' state, deepest
first. The cost per event therefore depends on how many registered steps the
event can satisfy, not on how many patterns are registered; `NaiveMatcher`
runs the same recurrence per pattern and is the baseline and the oracle of the
tests.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

from tether.agent.stream.records import Event
from tether.spec.streams import (  # the pure spec, shared with the operator and the controller
    Pattern,
    Step,
)

NEG_INF = -math.inf


@dataclasses.dataclass(frozen=True, slots=True)
class Match:
    pattern: str  # the id it was registered under
    start: float  # ts of the first event of the chain
    end: float  # ts of the completing event
    chain: tuple[int, ...]  # sequence numbers of the chain's events, in order


# ---------------------------------------------------------------- the trie


@dataclasses.dataclass(eq=False, slots=True)
class _Node:
    index: int
    step: int  # interned step id (-1 for the root)
    depth: int
    parent: _Node | None
    children: dict[int, _Node] = dataclasses.field(default_factory=dict)
    terminals: dict[str, float] = dataclasses.field(default_factory=dict)  # pattern id -> within
    max_within: float = NEG_INF  # over the patterns ending in this node's subtree
    start: float = NEG_INF  # the latest-starting partial match reaching this node
    chain: tuple[int, ...] = ()


class TrieMatcher:
    """Every registered pattern in one prefix trie; `feed(event, seq)` returns the matches it completes."""

    def __init__(self) -> None:
        self._root = _Node(index=0, step=-1, depth=0, parent=None)
        self._nodes: list[_Node] = [self._root]
        self._steps: list[Step] = []
        self._step_ids: dict[Step, int] = {}
        self._step_nodes: dict[int, list[_Node]] = {}  # step id -> its nodes, deepest first
        self._by_kind: dict[tuple[str, str | None], list[int]] = {}  # (type, page or None) -> step ids
        self._patterns: dict[str, tuple[Pattern, _Node]] = {}

    def __len__(self) -> int:
        return len(self._patterns)

    @property
    def node_count(self) -> int:
        return len(self._nodes) - 1

    def _intern(self, step: Step) -> int:
        sid = self._step_ids.get(step)
        if sid is None:
            sid = len(self._steps)
            self._steps.append(step)
            self._step_ids[step] = sid
            self._by_kind.setdefault((step.type, step.page), []).append(sid)
            self._step_nodes[sid] = []
        return sid

    def add(self, pattern_id: str, pattern: Pattern) -> None:
        """Register (or replace) a pattern. Its prefix nodes are shared with every other pattern."""
        if pattern_id in self._patterns:
            self.remove(pattern_id)
        node = self._root
        for step in pattern.steps:
            sid = self._intern(step)
            child = node.children.get(sid)
            if child is None:
                child = _Node(index=len(self._nodes), step=sid, depth=node.depth + 1, parent=node)
                self._nodes.append(child)
                node.children[sid] = child
                nodes = self._step_nodes[sid]
                nodes.append(child)
                nodes.sort(key=lambda n: -n.depth)
            node = child
        node.terminals[pattern_id] = pattern.within_s
        self._patterns[pattern_id] = (pattern, node)
        self._refresh_within(node)

    def remove(self, pattern_id: str) -> None:
        entry = self._patterns.pop(pattern_id, None)
        if entry is None:
            return
        _, node = entry
        node.terminals.pop(pattern_id, None)
        self._refresh_within(node)
        # Drop nodes no pattern ends in or passes through.
        while node.parent is not None and not node.children and not node.terminals:
            parent = node.parent
            del parent.children[node.step]
            self._step_nodes[node.step].remove(node)
            node.index = -1
            node = parent
        self._nodes = [n for n in self._nodes if n.index >= 0 or n is self._root]
        for i, n in enumerate(self._nodes):
            n.index = i

    @staticmethod
    def _refresh_within(node: _Node | None) -> None:
        while node is not None:
            best = max(node.terminals.values(), default=NEG_INF)
            for child in node.children.values():
                best = max(best, child.max_within)
            node.max_within = best
            node = node.parent

    def feed(self, event: Event, seq: int) -> list[Match]:
        ts = event.ts
        step_ids = self._by_kind.get((event.type, event.page), [])
        wildcard = self._by_kind.get((event.type, None), [])
        if not step_ids and not wildcard:
            return []
        steps = self._steps
        nodes: list[_Node] = []
        for sid in (*step_ids, *wildcard):
            if steps[sid].test(event):  # each distinct step once, however many patterns use it
                nodes.extend(self._step_nodes[sid])
        if len(step_ids) + len(wildcard) > 1:
            nodes.sort(key=lambda n: -n.depth)
        matches: list[Match] = []
        for node in nodes:  # deepest first: one event advances a partial match by one step only
            parent = node.parent
            assert parent is not None
            if parent is self._root:
                start = ts
                chain: tuple[int, ...] = (seq,)
            else:
                start = parent.start
                if ts - start > node.max_within:  # no partial match, or too old for every pattern below
                    continue
                chain = (*parent.chain, seq)
            for pattern_id, within in node.terminals.items():
                if ts - start <= within:
                    matches.append(Match(pattern_id, start, ts, chain))
            if node.children and start >= node.start:
                node.start, node.chain = start, chain
        return matches


# ---------------------------------------------------------------- the baseline


class NaiveMatcher:
    """The same semantics, one pattern at a time: every event is tested against every step of every pattern."""

    def __init__(self) -> None:
        self._patterns: dict[str, Pattern] = {}
        self._state: dict[str, list[tuple[float, tuple[int, ...]]]] = {}

    def __len__(self) -> int:
        return len(self._patterns)

    def add(self, pattern_id: str, pattern: Pattern) -> None:
        self._patterns[pattern_id] = pattern
        self._state[pattern_id] = [(NEG_INF, ())] * len(pattern.steps)

    def remove(self, pattern_id: str) -> None:
        self._patterns.pop(pattern_id, None)
        self._state.pop(pattern_id, None)

    def feed(self, event: Event, seq: int) -> list[Match]:
        ts = event.ts
        matches: list[Match] = []
        for pattern_id, pattern in self._patterns.items():
            state = self._state[pattern_id]
            k = len(pattern.steps)
            for j in range(k - 1, -1, -1):
                if not pattern.steps[j].test(event):
                    continue
                if j == 0:
                    start = ts
                    chain: tuple[int, ...] = (seq,)
                else:
                    start, prev = state[j - 1]
                    if ts - start > pattern.within_s:
                        continue
                    chain = (*prev, seq)
                if j == k - 1:
                    if ts - start <= pattern.within_s:
                        matches.append(Match(pattern_id, start, ts, chain))
                elif start >= state[j][0]:
                    state[j] = (start, chain)
        return matches


def feed_all(matcher: TrieMatcher | NaiveMatcher, events: Sequence[Event] | Iterable[Event]) -> list[Match]:
    """Feed a whole stream (sequence numbers 0, 1, ...) and collect every match (tests and benchmarks)."""
    out: list[Match] = []
    for seq, event in enumerate(events):
        out.extend(matcher.feed(event, seq))
    return out
