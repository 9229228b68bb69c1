"""`tether bench fl --quick --tether-path both`: the end-to-end path (the controller process and its round driver,
a Celery worker process, an embedded PostgreSQL, 6 real agents each holding its own shard) runs 2 rounds of 2
participants, the participants the bench drew, and its accuracy curve is the in-process strategies' curve."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tether.cli import bench
from tether.devtools import bench_fl_e2e


@pytest.mark.timeout(240)
def test_the_end_to_end_path_follows_the_drawn_participants_and_the_in_process_curve(tmp_path) -> None:
    out = tmp_path / "fl.json"
    args = ["fl", "--quick", "--tether-path", "both", "--sections", "flower", "--no-flower"]
    result = CliRunner().invoke(bench.bench, [*args, "--workdir", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())

    assert doc["tether_path"] == bench_fl_e2e.PATH_NAME  # the headline figures are the end-to-end path's
    assert set(doc["tether_paths"]) == {"in-process", "e2e"}
    assert doc["setup"]["devices"] == 6 and doc["setup"]["per_round"] == 2 and doc["setup"]["rounds"] == 2
    assert len(doc["participants"]) == 2 and all(len(p) == 2 for p in doc["participants"])
    e2e = doc["e2e"]
    assert e2e["agents"] == 6 and e2e["participants_as_drawn"] is True and e2e["refused"] == [0, 0]
    # Same maths, same data, same participants: the curves agree (at most a test sample apart, float32 rounding).
    assert len(doc["tether_accuracy"]) == 3
    assert doc["e2e_vs_in_process_max_gap"] <= 1 / 359
    assert doc["tether_accuracy"][-1] > doc["tether_accuracy"][0]
    # Round times come from the rounds' own timestamps, split into what set the pace.
    assert len(doc["tether_round_s_all"]) == 2 and all(s > 0 for s in doc["tether_round_s_all"])
    pace = e2e["pace_median_s"]
    assert set(pace) == {"open_to_first_update_s", "first_to_last_update_s", "last_update_to_served_s"}
    assert all(v >= 0 for v in pace.values())
    assert doc["round_time_ratio"] is None and doc["flower_accuracy"] is None  # Flower skipped
