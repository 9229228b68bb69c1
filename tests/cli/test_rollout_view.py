"""`tether status` for a staged rollout: stages, gates and counts with bars (tether.cli.rollout_view)."""

from __future__ import annotations

import io

from rich.console import Console

from tether.cli import rollout_view

HEALTH = {
    "version": 2,
    "stage": 1,
    "action": "progress",
    "stableVersion": 1,
    "onStable": 30,
    "stages": [
        {
            "index": 0,
            "eligible": 4,
            "installed": 4,
            "succeeded": 4,
            "failed": 0,
            "successRate": 1.0,
            "p95LatencySeconds": 0.4,
            "coverageSeconds": {"p50": 2.0, "p90": 5.5, "p99": 5.5},
        },
        {
            "index": 1,
            "eligible": 10,
            "installed": 5,
            "succeeded": 4,
            "failed": 1,
            "successRate": 0.8,
            "p95LatencySeconds": 0.9,
            "coverageSeconds": {"p50": 3.0},
        },
        {"index": 2, "eligible": 40, "installed": 5, "succeeded": 4, "failed": 1},
    ],
}
ROLLOUT = {
    "phase": "Paused",
    "currentStage": 1,
    "message": "Stage 2 (gray) failed its gates (errorRate is 0.2, must be <= 0.1): paused.",
    "stages": [
        {
            "name": "beta",
            "phase": "Passed",
            "gates": [{"metric": "successRate", "min": 0.9, "value": 1.0, "state": "Passed"}],
        },
        {
            "name": "gray",
            "phase": "Failed",
            "gates": [{"metric": "errorRate", "max": 0.1, "value": 0.2, "state": "Failed"}],
        },
        {"name": "full", "phase": "Pending"},
    ],
}


def text(renderable: object) -> str:
    out = io.StringIO()
    Console(file=out, width=160, color_system=None).print(renderable)
    return out.getvalue()


def test_bar() -> None:
    assert rollout_view.bar(0, 10, width=10) == "░" * 10
    assert rollout_view.bar(5, 10, width=10) == "█" * 5 + "░" * 5
    assert rollout_view.bar(12, 10, width=4) == "████" and rollout_view.bar(1, 0, width=3) == "░░░"


def test_stages_gates_and_counts_are_shown() -> None:
    shown = text(rollout_view.render(HEALTH, ROLLOUT))
    assert "version 2  stage 2/3" in shown and "Paused" in shown and "stable v1 (30 devices on it)" in shown
    assert "▶ gray" in shown and "beta" in shown and "full" in shown
    assert "80.0%" in shown and "p50=2s p90=5.5s p99=5.5s" in shown
    assert "gray: errorRate <= 0.1" in shown and "0.2  Failed" in shown
    assert "failed its gates" in shown


def test_without_the_object_the_controller_counts_still_show() -> None:
    shown = text(rollout_view.render(HEALTH))
    assert "stage-2" in shown and "Current" in shown and "gates" not in shown


def test_devices_silent_past_the_report_deadline_are_shown_per_stage() -> None:
    health = {**HEALTH, "reportDeadlineSeconds": 600}
    health["stages"] = [dict(s) for s in HEALTH["stages"]]
    health["stages"][1]["notReporting"] = 3
    out = text(rollout_view.render(health, ROLLOUT))
    assert "silent" in out and "no report 600s after notified" in out
    header = [c.strip() for c in next(line for line in out.splitlines() if line.startswith("stage")).split("┃")]
    rows = {
        cells[0].strip(" ▶"): [c.strip() for c in cells]
        for cells in (line.split("│") for line in out.splitlines() if "│" in line and "gate" not in line)
    }
    col = header.index("silent")
    assert (rows["gray"][col], rows["beta"][col], rows["full"][col]) == ("3", "-", "-")


def test_silent_devices_of_an_unstaged_release_are_shown_in_the_status_head() -> None:
    import dataclasses

    from tether.cli import status
    from tether.common.admin_client import ReleaseStatus

    base = ReleaseStatus(
        release="ns/t",
        version=2,
        manifest_digest="sha256:" + "0" * 64,
        targeted=5,
        notified=5,
        installed=3,
        succeeded=0,
        failed=0,
        refused=0,
        results=0,
        connected_devices=5,
        aggregate_round=0,
        aggregate=None,
        aggregate_json="",
    )
    assert "silent" not in text(status.render(base))
    shown = text(status.render(dataclasses.replace(base, not_reporting=2, report_deadline_s=120)))
    assert "silent" in shown and "2" in shown and "120 s" in shown
