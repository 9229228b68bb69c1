"""examples/shop-stats: a statistics task over a stream window, fed by the stream processor."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from tether.agent import runtime
from tether.agent.stream import processor
from tether.agent.stream.eventstore import EventStore
from tether.common import bundle_files
from tether.spec import triggers

REPO = pathlib.Path(__file__).resolve().parents[2]
SHOP = REPO / "examples" / "shop-stats" / "task"
T0 = 1_700_000_000.0

TRIGGER = {
    "type": "cron",
    "schedule": "0 * * * *",
    "window": {"seconds": 3600},
    "aggregate": [{"name": "dwell", "by": "page", "value": "dwell_ms", "ops": ["count", "mean"]}],
}


async def run_stats(tmp_path, inputs, state=None):
    return await runtime.run_task(
        bundle_dir=SHOP,
        bundle=bundle_files.build_manifest(SHOP),
        data_dir=tmp_path,
        state=state,
        work_dir=tmp_path,
        inputs=inputs,
        limits=runtime.TaskLimits(timeout_s=30, memory_mb=256),
    )


async def test_shop_stats_counts_a_window_once_and_histograms_dwell_time(tmp_path) -> None:
    clock = [T0 + 100]
    proc = processor.StreamProcessor(EventStore(tmp_path / "e.db", clock=lambda: clock[0]), clock=lambda: clock[0])
    trigger = triggers.Trigger.from_json(json.dumps(TRIGGER))
    proc.ingest(
        [
            {"type": "page_view", "page": "home", "ts": T0 + 1, "attrs": {"dwell_ms": 500}},
            {"type": "page_view", "page": "item", "ts": T0 + 2, "attrs": {"dwell_ms": 4_000}},
            {"type": "page_view", "page": "item", "ts": T0 + 3, "attrs": {"dwell_ms": 90_000}},
            {"type": "page_view", "page": "blog", "ts": T0 + 4, "attrs": {"dwell_ms": 1_500}},
            {"type": "add_to_cart", "page": "item", "ts": T0 + 5},
            {"type": "wishlist", "page": "item", "ts": T0 + 6},
        ]
    )
    inputs = proc.inputs_for(trigger.stream, now=clock[0])
    # count: the page's events (the cart and wishlist ones too); mean: over those with a dwell time
    assert inputs["aggregates"]["dwell"]["item"] == {"count": 4, "mean": 47_000}
    out = await run_stats(tmp_path, {**inputs, "trigger": {"type": "cron", "firedAt": clock[0]}})
    r = out.result
    assert r.sample_count == 6
    assert r.counts["events/page_view"] == 4 and r.counts["events/add_to_cart"] == 1 and r.counts["events/other"] == 1
    assert r.counts["views/item"] == 2 and r.counts["views/other"] == 1
    hist = r.tensors["dwell_hist"]
    assert hist.shape == (6, 7) and hist.sum() == 4
    assert hist[0, 0] == 1 and hist[2, 2] == 1 and hist[2, 6] == 1 and hist[5, 1] == 1
    assert r.metrics["dwell_mean_ms"] == (500 + 4_000 + 90_000 + 1_500) / 4
    assert out.state == {"last_ts": T0 + 6}

    # The next window overlaps the last: only new events count.
    clock[0] += 10
    proc.ingest([{"type": "page_view", "page": "cart", "ts": T0 + 50, "attrs": {"dwell_ms": 100}}])
    again = await run_stats(tmp_path, proc.inputs_for(trigger.stream, now=clock[0]), state=out.state)
    assert again.result.sample_count == 1 and again.result.counts["views/cart"] == 1
    assert again.result.tensors["dwell_hist"].sum() == 1


async def test_shop_stats_with_no_events_reports_zeros(tmp_path) -> None:
    out = await run_stats(tmp_path, {})
    assert out.result.sample_count == 0 and np.all(out.result.tensors["dwell_hist"] == 0)
