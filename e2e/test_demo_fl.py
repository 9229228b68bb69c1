"""The federated demo scenario, end to end: `tether demo --scenario fl` with each component as its own process.

Given a fresh machine state, when `tether demo --scenario fl` runs with 8 devices, 3 a round, 3 rounds, then
every round is published with an update from each selected device, the participants are the controller's
seeded draw over the connected devices, each round's model is a new release version, the held-out accuracy
climbs, the round history is shown, and nothing the demo started is left behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from e2e.conftest import processes_marked
from tether.devtools import bench_fl_sim, fldata

pytestmark = pytest.mark.e2e


def test_demo_fl_runs_rounds_live_and_the_accuracy_climbs(e2e_env, tmp_path):
    env, mark, tmp = e2e_env
    out = tmp_path / "outcome.json"
    args = ["demo", "--scenario", "fl", "--agents", "8", "--per-round", "3", "--rounds", "3", "--json-out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "tether.cli.main", *args], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    outcome = json.loads(out.read_text())
    assert outcome["ok"] is True and outcome["scenario"] == "fl"
    assert outcome["tls"] is True and outcome["signed"] is True  # derived versions signed with the trusted key

    devices = [fldata.device_name(i) for i in range(8)]
    drawn = bench_fl_sim.schedule(devices, rounds=3, per_round=3, seed=0)
    rounds = outcome["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [tuple(r["participants"]) for r in rounds] == drawn
    assert all(r["updates"] == 3 and r["refused"] == 0 for r in rounds)
    assert [r["version"] for r in rounds] == [2, 3, 4]  # one derived version per round
    assert len(outcome["accuracy"]) == 4 and outcome["accuracy"][-1] > outcome["accuracy"][0]
    history = outcome["federated"]["history"]
    assert [h["round"] for h in history] == [1, 2, 3] and all(h["phase"] == "Published" for h in history)

    for n in (1, 2, 3):
        assert f"round {n}/3: 3/3 updates folded" in proc.stdout
    assert "round history" in proc.stdout and "demo finished" in proc.stdout
    time.sleep(0.5)
    assert processes_marked(mark) == []
    assert list(tmp.iterdir()) == []
