"""shop-stats: per-page dwell-time histograms and event counts from the on-device behaviour stream.

A statistics task with no model. Its trigger declares a stream window and a
per-page aggregation (see mltask.yaml), so the agent hands it
`ctx.inputs["events"]` (the window's raw events, oldest first) and
`ctx.inputs["aggregates"]["dwell"]` ({page: {"count", "mean", ...}}). Raw
events stay on the device; only the fixed-shape histogram and counts leave it.

`ctx.state["last_ts"]` remembers the newest event already counted, so windows
that overlap between runs never count an event twice.

Output (aggregate with `tensors: sum`, `counts: sum`):
- tensors `dwell_hist` [len(PAGES), len(EDGES_MS) + 1]: page_view events per
  page and dwell-time bucket (milliseconds, upper bounds below; the last
  bucket is everything longer);
- counts `events/<type>` for KNOWN_TYPES (others in `events/other`), and
  `views/<page>`;
- metrics `dwell_mean_ms` over this device's new page views.
"""

from __future__ import annotations

import numpy as np

PAGES = ("home", "search", "item", "cart", "checkout", "other")
EDGES_MS = (1_000, 2_000, 5_000, 10_000, 30_000, 60_000)
KNOWN_TYPES = ("page_view", "click", "add_to_cart", "purchase")


def run(ctx):
    inputs = getattr(ctx, "inputs", None) or {}
    last_ts = float(ctx.state.get("last_ts", 0.0))
    events = [e for e in inputs.get("events") or [] if float(e["ts"]) > last_ts]

    hist = np.zeros((len(PAGES), len(EDGES_MS) + 1), dtype=np.float64)
    counts = {f"events/{t}": 0 for t in (*KNOWN_TYPES, "other")}
    counts.update({f"views/{p}": 0 for p in PAGES})
    dwell_total, dwell_n = 0.0, 0
    for e in events:
        kind = e["type"] if e["type"] in KNOWN_TYPES else "other"
        counts[f"events/{kind}"] += 1
        if e["type"] != "page_view":
            continue
        page = e.get("page") if e.get("page") in PAGES else "other"
        counts[f"views/{page}"] += 1
        dwell = (e.get("attrs") or {}).get("dwell_ms")
        if isinstance(dwell, int | float) and not isinstance(dwell, bool) and dwell >= 0:
            hist[PAGES.index(page), int(np.searchsorted(EDGES_MS, dwell, side="right"))] += 1
            dwell_total += float(dwell)
            dwell_n += 1

    if events:
        ctx.state["last_ts"] = max(float(e["ts"]) for e in events)
    pages_seen = sorted((inputs.get("aggregates") or {}).get("dwell", {}))
    ctx.log(f"{len(events)} new events, {dwell_n} page views with dwell time; pages in window: {pages_seen}")
    return {
        "sample_count": len(events),
        "metrics": {"dwell_mean_ms": dwell_total / dwell_n if dwell_n else 0.0},
        "tensors": {"dwell_hist": hist},
        "counts": counts,
    }
