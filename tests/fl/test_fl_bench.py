"""`tether bench fl --quick`: every key is written, the figures are consistent, and the Flower half is skipped
with a stated reason when flwr is not installed here (or run at toy size when it is)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from click.testing import CliRunner

from tether.cli import bench
from tether.devtools import bench_fl, bench_fl_sim, fldata

KEYS = (
    "flower_accuracy",
    "tether_accuracy",
    "max_round_gap",
    "flower_round_s",
    "tether_round_s",
    "round_time_ratio",
    "best_strategy",
    "best_rounds_to_0_90",
    "aggregation_throughput_ratio",
    "aggregation_peak_memory_ratio",
    "poisoned",
)
HAVE_FLOWER = importlib.util.find_spec("flwr") is not None and importlib.util.find_spec("ray") is not None


def _run(tmp_path, *extra: str) -> dict:
    out, table = tmp_path / "fl.json", tmp_path / "fl.md"
    args = ["fl", "--quick", "--workdir", str(tmp_path), "--out", str(out), "--markdown", str(table), *extra]
    result = CliRunner().invoke(bench.bench, args)
    assert result.exit_code == 0, result.output
    doc: dict = json.loads(out.read_text())
    rows = table.read_text().splitlines()
    assert rows[0].startswith("| round |") and len(rows) == 2 + len(doc["tether_accuracy"] or [])
    return doc


def test_the_quick_benchmark_writes_every_key(tmp_path) -> None:
    doc = _run(tmp_path, *([] if HAVE_FLOWER else ["--no-flower"]))
    for key in KEYS:
        assert key in doc, key
    assert doc["tether_path"] == "in-process strategies"
    assert len(doc["tether_accuracy"]) == 4 and all(0.0 <= a <= 1.0 for a in doc["tether_accuracy"])
    assert len(doc["participants"]) == 3 and all(len(p) == 10 for p in doc["participants"])
    # pooled data trains faster than 3 federated rounds of ~14 samples a device
    assert set(doc["centralized_accuracy"]) == {"1", "3"}
    assert doc["centralized_accuracy"]["3"] > doc["tether_accuracy"][-1]
    if HAVE_FLOWER:
        assert doc["same_participants"] is True and doc["max_round_gap"] <= 0.02
        assert doc["round_time_ratio"] == pytest.approx(doc["tether_round_s"] / doc["flower_round_s"])
    else:
        assert doc["flower_accuracy"] is None and doc["flower"]["skipped"] == "--no-flower"
    assert doc["best_strategy"] in doc["rounds_to_0_90"]
    assert [row["strategy"] for row in doc["strategy_grid"]] == [name for name, _ in bench_fl.QUICK_GRID]
    # the fold and NumPy computed the same mean; the fold holds one float64 model and an update (+ chunks)
    assert doc["aggregation_results_agree"] is True and doc["aggregation_throughput_ratio"] > 0
    assert doc["aggregation_updates"] == 20 and doc["aggregation_update_bytes"] == 80_000
    assert set(doc["poisoned"]) == {"fedAvg", "median", "trimmedMean", "krum", "multiKrum"}
    for row in doc["poisoned"].values():
        assert row["drop"] == pytest.approx(row["clean"] - row["poisoned"])
    assert len(doc["poisoned_devices"]) == 10


def test_without_flwr_the_flower_half_says_how_to_install_it(tmp_path) -> None:
    doc = _run(tmp_path, "--flower-python", "/bin/false", "--sections", "flower")
    assert doc["flower_accuracy"] is None and doc["round_time_ratio"] is None
    assert "pip install 'flwr[simulation]==1.42.0'" in doc["flower"]["skipped"]
    assert "best_strategy" not in doc and "poisoned" not in doc


def test_an_unknown_section_is_refused(tmp_path) -> None:
    result = CliRunner().invoke(bench.bench, ["fl", "--quick", "--sections", "flower,speed"])
    assert result.exit_code != 0 and "speed" in result.output


def test_the_schedule_is_the_controllers_seeded_draw_and_poison_is_a_fixed_tenth() -> None:
    devices = [fldata.device_name(i) for i in range(100)]
    plan = bench_fl_sim.schedule(devices, rounds=5, per_round=10, seed=0)
    assert plan == bench_fl_sim.schedule(list(reversed(devices)), rounds=5, per_round=10, seed=0)
    assert all(len(set(p)) == 10 and list(p) == sorted(p) for p in plan) and len(set(plan)) == 5
    attackers = bench_fl_sim.poisoned_devices(devices, fraction=0.1, seed=0)
    assert len(attackers) == 10 and attackers == bench_fl_sim.poisoned_devices(devices, fraction=0.1, seed=0)


def test_a_poisoned_participant_sends_minus_a_hundred_times_its_delta() -> None:
    example = bench_fl_sim.example_dir()
    fltrain = bench_fl_sim.load_fltrain(example)
    split = fldata.digits_split()
    setup = bench_fl_sim.Setup(rounds=1)
    path = bench_fl_sim.InProcessPath(fltrain=fltrain, split=split, setup=setup)
    device = split.shards[0].device
    from tether.controller.fl import aggregators
    from tether.spec import strategies

    def delta(poisoned: frozenset[str]) -> dict:
        out = path.round(
            strategy=strategies.FedAvg(),
            global_model=fltrain.initial_weights(0),
            state=aggregators.ServerState(),
            participants=[device],
            round_index=0,
            poisoned=poisoned,
        )
        assert out.outcome is not None and out.refused == 0
        return out.outcome.delta

    honest, bad = delta(frozenset()), delta(frozenset({device}))
    for name in honest:
        assert bad[name] == pytest.approx(-100.0 * honest[name], rel=1e-5, abs=1e-9)


def test_a_round_refuses_what_cannot_be_folded_and_a_broken_model_publishes_nothing() -> None:
    import numpy as np

    from tether.controller.fl import aggregators
    from tether.spec import strategies

    fltrain = bench_fl_sim.load_fltrain(bench_fl_sim.example_dir())
    split = fldata.digits_split()
    path = bench_fl_sim.InProcessPath(fltrain=fltrain, split=split, setup=bench_fl_sim.Setup(rounds=1))
    broken = fltrain.initial_weights(0)
    broken["fc2.bias"][0] = np.inf  # what float32 overflow leaves after a poisoned FedAvg round
    devices = [s.device for s in split.shards[:3]]
    result = path.round(
        strategy=strategies.FedAvg(),
        global_model=broken,
        state=aggregators.ServerState(),
        participants=devices,
        round_index=0,
        poisoned=frozenset(),
    )
    assert result.outcome is None and result.refused == 3
    curve = bench_fl_sim.run_rounds(
        path,
        strategy=strategies.FedAvg(),
        initial=broken,
        plan=[devices, devices],
        evaluate=lambda w: fltrain.evaluate(w, split.X_test, split.y_test),
    )
    assert curve.refused == [3, 3] and len(curve.accuracy) == 3


def test_the_fold_child_reports_its_own_peak_and_not_its_parents(tmp_path) -> None:
    """ru_maxrss survives exec on Linux; the child must report its own address space's high-water mark."""
    import numpy as np

    from tether.devtools import bench_fl_agg

    bench_fl_agg.prepare(tmp_path, updates=3, params=1000, seed=0)
    ballast = np.ones(40_000_000)  # 320 MB in the parent
    report = bench_fl_agg.measure(tmp_path, side="tether", updates=3, block=3)
    assert float(ballast[-1]) == 1.0
    assert 0 < report["rss_before"] <= report["peak_rss"] < 300_000_000
