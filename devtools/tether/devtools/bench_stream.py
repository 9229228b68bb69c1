"""`tether bench stream`: events per second matched by the trie vs the naive per-pattern scan.

One seeded synthetic shop stream (12 event types, 50 pages, numeric and
categorical attributes, exponential inter-arrival times) and N seeded random
patterns of 2 to 4 steps (a type, mostly a page, sometimes an attribute
condition, a time bound of 5 to 60 s), for each N in --patterns (default
1, 100, 1000). Both matchers see the same events in the same process; each
runs until the stream ends or --budget seconds pass, and the matches of the
events both processed must be identical (the run fails otherwise). The figure
is the ratio of their throughputs. A last row measures the whole ingestion
path (validation, the SQLite store, matching) with the largest N.

    tether bench stream --out bench-stream.json
    python bench/stream.py --events 20000 --patterns 1,100,1000
"""

from __future__ import annotations

import json
import pathlib
import platform
import random
import sys
import tempfile
import time
from typing import Any

import click

from tether.agent.stream import patterns, processor
from tether.agent.stream.eventstore import EventStore
from tether.agent.stream.records import Event
from tether.spec import streams

TYPES = [
    "page_view",
    "click",
    "scroll",
    "search",
    "add_to_cart",
    "remove_from_cart",
    "favorite",
    "share",
    "checkout",
    "purchase",
    "review",
    "exit",
]
PAGES = [f"page{i}" for i in range(50)]
CATS = ["shoes", "bags", "books", "toys", "food"]
T0 = 1_700_000_000.0


def make_events(n: int, *, seed: int) -> list[Event]:
    rng = random.Random(seed)
    t = T0
    out = []
    for _ in range(n):
        t += rng.expovariate(2.0)
        out.append(
            Event(
                type=rng.choice(TYPES),
                page=rng.choice(PAGES),
                ts=t,
                attrs={"price": rng.randint(0, 100), "cat": rng.choice(CATS), "dwell_ms": rng.randint(0, 60_000)},
            )
        )
    return out


def make_patterns(n: int, *, seed: int) -> dict[str, streams.Pattern]:
    rng = random.Random(seed)
    out = {}
    for i in range(n):
        steps = []
        for _ in range(rng.randint(2, 4)):
            step: dict[str, Any] = {"type": rng.choice(TYPES)}
            if rng.random() < 0.8:
                step["page"] = rng.choice(PAGES)
            if rng.random() < 0.3:
                step["where"] = rng.choice(
                    [{"price": {"gte": rng.randint(10, 90)}}, {"cat": rng.choice(CATS)}, {"cat": {"in": CATS[:2]}}]
                )
            steps.append(step)
        out[f"p{i}"] = streams.Pattern.from_json({"steps": steps, "within": rng.choice([5, 10, 30, 60])})
    return out


def _run(matcher: Any, events: list[Event], budget_s: float) -> tuple[int, float, list[patterns.Match]]:
    matches: list[patterns.Match] = []
    started = time.perf_counter()
    deadline = started + budget_s
    n = 0
    for seq, event in enumerate(events):
        matches.extend(matcher.feed(event, seq))
        n = seq + 1
        if (n & 255) == 0 and time.perf_counter() > deadline:
            break
    return n, time.perf_counter() - started, matches


def measure(n_patterns: int, events: list[Event], *, seed: int, budget_s: float) -> dict[str, Any]:
    registered = make_patterns(n_patterns, seed=seed)
    trie, naive = patterns.TrieMatcher(), patterns.NaiveMatcher()
    for pid, p in registered.items():
        trie.add(pid, p)
        naive.add(pid, p)
    trie_n, trie_s, trie_m = _run(trie, events, budget_s)
    naive_n, naive_s, naive_m = _run(naive, events, budget_s)
    common = min(trie_n, naive_n)
    key = lambda m: (m.chain[-1], m.pattern, m.start, m.chain)  # noqa: E731
    same = sorted((m for m in trie_m if m.chain[-1] < common), key=key) == sorted(
        (m for m in naive_m if m.chain[-1] < common), key=key
    )
    if not same:
        raise click.ClickException(f"trie and naive scan disagree with {n_patterns} patterns")
    trie_eps, naive_eps = trie_n / trie_s, naive_n / naive_s
    return {
        "patterns": n_patterns,
        "trie_nodes": trie.node_count,
        "steps": sum(len(p.steps) for p in registered.values()),
        "trie_events": trie_n,
        "trie_events_per_s": trie_eps,
        "naive_events": naive_n,
        "naive_events_per_s": naive_eps,
        "speedup": trie_eps / naive_eps,
        "matches_per_1k_events": 1000.0 * sum(1 for m in trie_m if m.chain[-1] < common) / max(common, 1),
        "matches_identical": same,
    }


def measure_ingest(n_patterns: int, events: list[Event], *, seed: int, batch: int = 100) -> dict[str, Any]:
    """The whole path apps hit: validate -> SQLite store (with retention) -> trie, batches of `batch`."""
    docs = [e.to_json() for e in events]
    with tempfile.TemporaryDirectory() as tmp:
        clock = lambda: events[-1].ts  # noqa: E731  (retention keeps everything)
        proc = processor.StreamProcessor(EventStore(pathlib.Path(tmp) / "events.db", clock=clock), clock=clock)
        for pid, p in make_patterns(n_patterns, seed=seed).items():
            proc.register(pid, streams.StreamSpec(pattern=p))
        started = time.perf_counter()
        for i in range(0, len(docs), batch):
            proc.ingest(docs[i : i + batch])
        elapsed = time.perf_counter() - started
        proc.store.close()
    return {"patterns": n_patterns, "events": len(docs), "batch": batch, "events_per_s": len(docs) / elapsed}


def render(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Event-pattern matching: trie vs naive per-pattern scan (same events, same run)")
    for col in ("patterns", "trie nodes", "trie events/s", "naive events/s", "speedup", "matches/1k events"):
        table.add_column(col, justify="right")
    for r in report["results"]:
        table.add_row(
            str(r["patterns"]),
            str(r["trie_nodes"]),
            f"{r['trie_events_per_s']:,.0f}",
            f"{r['naive_events_per_s']:,.0f}",
            f"{r['speedup']:.1f}x",
            f"{r['matches_per_1k_events']:.1f}",
        )
    console = Console()
    console.print(table)
    ing = report.get("ingest")
    if ing:
        console.print(
            f"ingest (validate + SQLite store + trie, {ing['patterns']} patterns, batches of {ing['batch']}): "
            f"{ing['events_per_s']:,.0f} events/s"
        )


@click.command("stream")
@click.option("--events", "n_events", type=click.IntRange(1000, 10_000_000), default=50_000, show_default=True)
@click.option("--patterns", "counts", default="1,100,1000", show_default=True, help="Comma-separated pattern counts.")
@click.option("--budget", type=click.FloatRange(0.1, 600), default=5.0, show_default=True, help="Seconds per matcher.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--ingest/--no-ingest", default=True, show_default=True, help="Also time the whole ingestion path.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the JSON report here.")
def stream(n_events: int, counts: str, budget: float, seed: int, ingest: bool, out: str | None) -> None:
    """Events/s matched with 1, 100 and 1,000 registered patterns: trie vs naive scan."""
    try:
        sizes = [int(c) for c in counts.split(",") if c.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{counts!r} is not a comma-separated list of integers", param_hint="--patterns"
        ) from None
    events = make_events(n_events, seed=seed)
    report: dict[str, Any] = {
        "benchmark": "stream",
        "config": {"events": n_events, "budget_s": budget, "seed": seed, "types": len(TYPES), "pages": len(PAGES)},
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpu": platform.processor()},
        "results": [measure(n, events, seed=seed + n, budget_s=budget) for n in sizes],
    }
    if ingest and sizes:
        report["ingest"] = measure_ingest(max(sizes), events[: min(len(events), 20_000)], seed=seed + max(sizes))
    render(report)
    text = json.dumps(report, indent=2)
    if out:
        pathlib.Path(out).write_text(text + "\n")
        click.echo(f"wrote {out}")


if __name__ == "__main__":
    stream()
