"""The demo scenario, end to end: `tether demo` with each component as its own process.

Given a fresh machine state, when `tether demo` runs, then the example MLTask
reaches every targeted device, each runs the MNN model, the aggregate covers
every device's result, and nothing the demo started is left behind.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from e2e.conftest import cmdlines_marked, processes_marked

pytestmark = pytest.mark.e2e


def test_demo_rolls_out_runs_and_aggregates(e2e_env, tmp_path):
    env, mark, tmp = e2e_env
    out = tmp_path / "outcome.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tether.cli.main", "demo", "--agents", "12", "--json-out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    outcome = json.loads(out.read_text())
    assert outcome["ok"] is True
    assert outcome["tls"] is True and outcome["signed_by"]  # the secure path (TLS, signed bundle) is the default
    assert outcome["phase"] == "Succeeded"
    assert 0 < outcome["targeted"] <= 12
    assert outcome["succeeded"] == outcome["targeted"] == outcome["installed"]
    agg = outcome["aggregate"]
    assert agg["results"] == agg["devices"] == outcome["targeted"]
    # Internal consistency of the aggregate: the accuracy is the weighted mean of the
    # devices' accuracies, so it equals correct / samples from the summed counts.
    assert agg["counts"]["samples"] == agg["samples"] > 0
    assert agg["metrics"]["accuracy"] == pytest.approx(agg["counts"]["correct"] / agg["samples"], abs=1e-9)
    assert agg["metrics"]["accuracy"] > 0.85
    assert sum(agg["tensors"]["mean_probs"]["values"]) == pytest.approx(1.0, abs=1e-4)
    assert "demo finished" in proc.stdout
    # Nothing left behind: no process, no temporary directory.
    time.sleep(0.5)
    assert processes_marked(mark) == []
    assert list(tmp.iterdir()) == []


def test_demo_output_is_plain_for_a_newcomer(e2e_env):
    """No library warning leaks out (XDG_RUNTIME_DIR unset is the usual container case), no `0/?` row,
    and each progress row says what it counts."""
    env, _, _ = e2e_env
    env = {k: v for k, v in env.items() if k not in ("XDG_RUNTIME_DIR", "PYTHONWARNINGS")}
    proc = subprocess.run(
        [sys.executable, "-m", "tether.cli.main", "demo", "--agents", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Warning" not in output and "warn(" not in output, output
    assert "0/?" not in output and "\nphase: " not in output
    for label in ("devices notified", "devices installed", "devices ran the task", "results aggregated"):
        assert label in proc.stdout, label
    assert "of the 3 devices" in proc.stdout and "MLTask phase: Succeeded" in proc.stdout


def test_ctrl_c_stops_everything_the_demo_started(e2e_env):
    env, mark, tmp = e2e_env
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether.cli.main", "demo", "--agents", "4"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    # Wait until the fleet of devices is up (the last component to start), then interrupt.
    def fleet_running() -> bool:
        return any("fleet" in cmdline for cmdline in cmdlines_marked(mark))

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not fleet_running():
        time.sleep(0.2)
    assert fleet_running(), "the demo did not start its components"
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output[-3000:]
    time.sleep(0.5)
    assert cmdlines_marked(mark) == []
    assert list(tmp.iterdir()) == []


def test_demo_with_blobs_from_an_nginx_origin(e2e_env, tmp_path):
    from tether.devtools import origin

    if origin.nginx_binary() is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    env, mark, tmp = e2e_env
    out = tmp_path / "outcome.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tether.cli.main", "demo", "--agents", "4", "--blobs", "http", "--json-out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    outcome = json.loads(out.read_text())
    assert outcome["ok"] is True and outcome["succeeded"] == outcome["targeted"] > 0
    blobs = outcome["blobs"]
    # Every targeted device fetched the bundle from nginx by its own signed URLs; no blob byte came
    # through the controller.
    assert blobs["mode"] == "http" and blobs["origin"].startswith("http://127.0.0.1:")
    assert blobs["origin_devices"] == outcome["targeted"] and blobs["origin_bytes"] > 0
    assert blobs["controller_blob_bytes"] == 0
    assert "devices pulled from the origin" in proc.stdout
    time.sleep(0.5)
    assert processes_marked(mark) == []  # nginx too
    assert list(tmp.iterdir()) == []
