"""A federated task's rounds in `tether status`: the current round and the metric per round as a terminal plot.

Reads `ReleaseStatus.federated_json` (docs/internals.md "Federated rounds"). The plot follows each round's
`value`, the metric stopOn follows (server-side on the held-out set when the task ships one, else the
devices' sample-weighted metric), falling back to the devices' metric of that name for documents without it.
`plot` draws it `height` rows tall in block characters, one column per round (the latest `width` rounds),
scaled between the lowest and highest value shown; a round without a value is a gap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

BLOCKS = " ▁▂▃▄▅▆▇█"


def values_of(doc: Mapping[str, Any]) -> tuple[str, list[tuple[int, float | None]]]:
    """The followed metric's name and (round, value) per published round."""
    metric = str(doc.get("metric") or "")
    out: list[tuple[int, float | None]] = []
    for h in doc.get("history") or []:
        if h.get("phase") != "Published":
            continue
        value = h.get("value")
        if value is None and metric:
            value = (h.get("metrics") or {}).get(metric)
        number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        out.append((int(h.get("round", 0)), number if number is not None and math.isfinite(number) else None))
    return metric, out


def plot(values: Sequence[float | None], *, height: int = 4, width: int = 60) -> list[str]:
    """`height` lines of block characters, top first, one column per value (the last `width` values)."""
    shown = list(values)[-width:]
    present = [v for v in shown if v is not None]
    if not present:
        return []
    low, high = min(present), max(present)
    span = high - low
    steps = height * (len(BLOCKS) - 1)
    rows = [[" "] * len(shown) for _ in range(height)]
    for col, v in enumerate(shown):
        if v is None:
            continue
        level = steps if span == 0 else max(1, round((v - low) / span * steps))  # the lowest value still shows
        for row in range(height):
            fill = min(max(level - row * (len(BLOCKS) - 1), 0), len(BLOCKS) - 1)
            rows[height - 1 - row][col] = BLOCKS[fill]
    return ["".join(r) for r in rows]


def render(doc: Mapping[str, Any] | None) -> Table | None:
    """The federated panel of `tether status`; None for a task that is not federated (or has no round yet)."""
    if not doc:
        return None
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    refused = sum(int(v) for v in (doc.get("refused") or {}).values())
    table.add_row("round", f"{doc.get('round', 0)}  [bold]{doc.get('phase', '')}[/]")
    table.add_row(
        "participants",
        f"{doc.get('selected', 0)} selected, {doc.get('received', 0)} updates received"
        + (f", {refused} refused" if refused else ""),
    )
    if doc.get("epsilon") is not None:
        table.add_row("privacy", f"ε = {float(doc['epsilon']):.3g} at δ = {doc.get('delta')}")
    metric, points = values_of(doc)
    lines = plot([v for _, v in points])
    if lines:
        present = [v for _, v in points if v is not None]
        last = next(((n, v) for n, v in reversed(points) if v is not None))
        table.add_row(
            metric or "metric",
            f"{last[1]:.4f} after round {last[0]}  (min {min(present):.4f}, max {max(present):.4f})",
        )
        first_round = points[-len(lines[0]) :][0][0]
        for i, line in enumerate(lines):
            label = f"{max(present):.3f}" if i == 0 else (f"{min(present):.3f}" if i == len(lines) - 1 else "")
            table.add_row(Text(label, style="dim"), Text(line, style="cyan"))
        table.add_row("", Text(f"round {first_round} → {points[-1][0]}", style="dim"))
    if doc.get("evaluationError"):
        table.add_row("evaluation", f"[red]{doc['evaluationError']}[/]")
    return table
