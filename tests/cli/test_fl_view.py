"""`tether status` on a federated task: the current round, participants, updates, and the metric per round plotted
in the terminal (tether.cli.fl_view over ReleaseStatus.federated_json)."""

from __future__ import annotations

import types

from rich.console import Console

from tether.cli import fl_view, status


def text(renderable) -> str:
    console = Console(width=120, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def doc(values: list[float | None], **extra) -> dict:
    history = [{"round": i + 1, "phase": "Published", "value": v, "metrics": {}} for i, v in enumerate(values)]
    history.append({"round": len(values) + 1, "phase": "Collecting", "metrics": {}})
    return {
        "round": len(values) + 1,
        "phase": "Collecting",
        "selected": 10,
        "received": 4,
        "refused": {"NotSelected": 2},
        "metric": "accuracy",
        "history": history,
        **extra,
    }


def test_the_plot_has_one_column_per_round_rising_with_the_value_and_gaps_where_a_round_has_none() -> None:
    lines = fl_view.plot([0.1, 0.5, None, 0.9], height=2)
    assert len(lines) == 2 and all(len(line) == 4 for line in lines)
    assert lines[1][2] == " " and lines[0][2] == " "  # the unscored round
    assert lines[0][3] == "█" and lines[1][3] == "█"  # the highest fills both rows
    assert lines[0][0] == " " and lines[1][0] == "▁"  # the lowest still shows
    assert lines[0][1] == " " and lines[1][1] == "█"  # the middle fills the lower row only
    assert fl_view.plot([None, None]) == [] and fl_view.plot([0.7, 0.7], height=1) == ["██"]
    assert len(fl_view.plot([float(i) for i in range(100)], width=30)[0]) == 30  # the latest rounds only


def test_status_shows_the_round_participants_updates_and_the_metric_per_round() -> None:
    shown = text(fl_view.render(doc([0.2, 0.5, 0.8])))
    assert "4  Collecting" in shown
    assert "10 selected, 4 updates received, 2 refused" in shown
    assert "accuracy" in shown and "0.8000 after round 3" in shown and "min 0.2000" in shown
    assert "round 1 → 3" in shown and "█" in shown
    assert fl_view.render(None) is None and fl_view.render({}) is None
    # a document from before `value` existed: the devices' metric of that name is plotted
    old = doc([]) | {"history": [{"round": 1, "phase": "Published", "metrics": {"accuracy": 0.4}}]}
    assert "0.4000 after round 1" in text(fl_view.render(old))


def test_an_evaluation_error_is_shown_and_the_whole_status_carries_the_rounds() -> None:
    failed = doc([None, None], evaluationError="federated.evaluation.server.model 'm.onnx': not an ONNX model")
    shown = text(fl_view.render(failed))
    assert "not an ONNX model" in shown and "after round" not in shown
    release = types.SimpleNamespace(
        release="ml/fl",
        version=3,
        manifest_digest="sha256:" + "0" * 64,
        targeted=10,
        notified=10,
        installed=10,
        succeeded=9,
        failed=0,
        results=9,
        not_reporting=0,
        health=None,
        aggregate=None,
        federated=doc([0.3, 0.6]),
    )
    whole = text(status.render(release))
    assert "0.6000 after round 2" in whole and "10 selected, 4 updates received" in whole
