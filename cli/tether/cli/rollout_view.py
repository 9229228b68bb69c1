"""The staged-rollout part of `tether status`: stages, gates and live counts with progress bars.

Counts come from the controller (`ReleaseStatus.health_json`: per stage,
cumulative over nested stages); stage names, phases and gate verdicts come
from the MLTask's `status.rollout` when the CLI can read the object
(`--kubeconfig`), since the operator owns those decisions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

BAR_WIDTH = 12


def bar(done: int, total: int, *, width: int = BAR_WIDTH) -> str:
    """A text progress bar, `done` of `total`."""
    if total <= 0:
        return "░" * width
    filled = round(width * min(done, total) / total)
    return "█" * filled + "░" * (width - filled)


def _rate(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.1f}%"


def render(health: Mapping[str, Any], rollout: Mapping[str, Any] | None = None) -> RenderableType:
    """A table of every stage: phase, devices reached, installed / succeeded / failed bars, rates, gates."""
    stages: Sequence[Mapping[str, Any]] = health.get("stages") or []
    named: Sequence[Mapping[str, Any]] = (rollout or {}).get("stages") or []
    current = int((rollout or {}).get("currentStage", health.get("stage", 0)))
    head = Text()
    phase = (rollout or {}).get("phase")
    head.append("rollout ", style="bold")
    head.append(f"version {health.get('version')}  stage {current + 1}/{len(stages) or len(named)}")
    if phase:
        head.append(f"  {phase}", style="bold yellow" if phase in ("Paused", "RolledBack") else "bold green")
    head.append(f"  action {health.get('action')}  stable v{health.get('stableVersion') or '-'}")
    if health.get("onStable"):
        head.append(f" ({health['onStable']} devices on it)")
    if health.get("reportDeadlineSeconds"):
        head.append(f"  silent = no report {health['reportDeadlineSeconds']}s after notified")
    message = (rollout or {}).get("message")
    table = Table(show_edge=False, pad_edge=False, expand=False)
    columns = (
        "stage",
        "state",
        "devices",
        "installed",
        "succeeded",
        "failed",
        "silent",
        "success",
        "p95 s",
        "coverage",
    )
    for column in columns:
        table.add_column(column, justify="right" if column in ("devices", "silent", "success", "p95 s") else "left")
    gate_rows: list[tuple[str, str]] = []
    frozen = phase == "RolledBack"  # the operator kept the counts the version was judged on
    for i in range(max(len(stages), len(named))):
        h = stages[i] if i < len(stages) and not frozen else {}
        n = named[i] if i < len(named) else {}
        eligible = int(h.get("eligible", n.get("eligible", 0)) or 0)
        installed = int(h.get("installed", n.get("installed", 0)) or 0)
        succeeded = int(h.get("succeeded", n.get("succeeded", 0)) or 0)
        failed = int(h.get("failed", n.get("failed", 0)) or 0)
        silent = int(h.get("notReporting", n.get("notReporting", 0)) or 0)  # told, no report past the deadline
        state = n.get("phase") or ("Current" if i == current else ("Done" if i < current else "Pending"))
        coverage = h.get("coverageSeconds") or n.get("coverageSeconds") or {}
        cov = " ".join(f"{k}={v:g}s" for k, v in sorted(coverage.items(), key=lambda kv: int(kv[0][1:])))
        p95 = h.get("p95LatencySeconds", n.get("p95LatencySeconds"))
        marker = "▶ " if i == current else "  "
        table.add_row(
            f"{marker}{n.get('name') or f'stage-{i + 1}'}",
            state,
            str(eligible),
            f"{bar(installed, eligible)} {installed}",
            f"{bar(succeeded, eligible)} {succeeded}",
            f"{bar(failed, eligible)} {failed}",
            str(silent) if silent else "-",
            _rate(h.get("successRate", n.get("successRate"))),
            "-" if p95 is None else f"{float(p95):.2f}",
            cov or "-",
        )
        for g in n.get("gates") or []:
            bound = " ".join(
                part
                for part in (
                    f">= {g['min']:g}" if g.get("min") is not None else "",
                    f"<= {g['max']:g}" if g.get("max") is not None else "",
                )
                if part
            )
            value = "-" if g.get("value") is None else f"{float(g['value']):.4g}"
            gate_rows.append(
                (f"{n.get('name') or f'stage-{i + 1}'}: {g.get('metric')} {bound}", f"{value}  {g.get('state')}")
            )
    parts: list[RenderableType] = [head]
    if message:
        parts.append(Text(message, style="dim"))
    parts.append(table)
    if gate_rows:
        gates = Table(title="gates", title_justify="left", show_edge=False)
        gates.add_column("gate")
        gates.add_column("value / state")
        for row in gate_rows:
            gates.add_row(*row)
        parts.append(gates)
    return Group(*parts)
