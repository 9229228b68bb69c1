"""`tether bench fl --quick --tether-path both`: the end-to-end path (the controller process and its round driver,
a Celery worker process, an embedded PostgreSQL, 6 real agents each holding its own shard) runs 2 rounds of 2
participants, the participants the bench drew, and its accuracy curve is the in-process strategies' curve."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from tether.cli import bench
from tether.controller.fl import aggregators
from tether.devtools import bench_fl_e2e, fldata
from tether.spec import strategies


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


def _record(number: int, selected: tuple[str, ...]) -> bench_fl_e2e.RoundRecord:
    return bench_fl_e2e.RoundRecord(
        number=number,
        phase="Published",
        selected=selected,
        received=selected,
        refused=0,
        samples=10 * len(selected),
        opened=100.0,
        first_update=101.0,
        last_update=101.5,
        served=102.0,
        version=number + 1,
    )


def test_a_round_whose_participants_are_not_the_benchs_draw_stops_the_run(tmp_path) -> None:
    """No stack is started: the run's two reads are replaced, so only the path's own checks are exercised."""
    split = fldata.digits_split(devices=6, seed=0)
    path = bench_fl_e2e.EndToEndPath(bench_fl_e2e.Config(per_round=2, rounds=1), split=split, example=tmp_path)
    model = {"w": np.ones((2, 2), dtype=np.float32)}
    controller_drew = ("device-001", "device-004")

    async def published(number: int) -> bench_fl_e2e.RoundRecord:
        return _record(number, controller_drew)

    async def exported(number: int) -> dict[str, np.ndarray]:
        return {"w": np.full((2, 2), 1.5, dtype=np.float32)}

    path.run.published, path.run.model = published, exported  # type: ignore[method-assign]
    args = {"global_model": model, "state": aggregators.ServerState(), "round_index": 0, "poisoned": frozenset()}
    try:
        with pytest.raises(bench_fl_e2e.RunFailed, match="the bench drew"):
            path.round(strategy=strategies.FedAvg(), participants=("device-000", "device-004"), **args)
        with pytest.raises(bench_fl_e2e.RunFailed, match="FedAvg"):
            path.round(strategy=strategies.FedProx(proximal_mu=0.1), participants=controller_drew, **args)
        result = path.round(strategy=strategies.FedAvg(), participants=controller_drew, **args)
        assert result.outcome is not None and result.refused == 0
        assert result.outcome.devices == controller_drew and result.outcome.samples == 20
        np.testing.assert_array_equal(result.outcome.model["w"], np.full((2, 2), 1.5, dtype=np.float32))
        assert [r.number for r in path.records] == [1]
        assert path.records[0].wall_s == 2.0
        assert path.records[0].pace() == {
            "open_to_first_update_s": 1.0,
            "first_to_last_update_s": 0.5,
            "last_update_to_served_s": 0.5,
        }
    finally:
        path.close()
