"""`tether bench soak` at toy size: churn, a controller SIGKILL, three stages and a rollback; every device checked."""

from __future__ import annotations

import json

from click.testing import CliRunner

from tether.cli import bench


def test_the_soak_converges_device_by_device_and_reports_its_figures(tmp_path, database_url, broker_url):
    out = tmp_path / "soak.json"
    result = CliRunner().invoke(
        bench.bench,
        [
            "soak",
            "--agents", "8",
            "--processes", "1",
            "--duration", "6",
            "--churn", "0.5",
            "--churn-every", "1",
            "--controller-kills", "1",
            "--bake", "0.5",
            "--settle-timeout", "90",
            "--database-url", database_url,
            "--broker-url", broker_url,
            "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert [s["converged"] for s in doc["stages"]] == [True, True, True]
    assert doc["rollback"]["converged"] and doc["settle"]["converged"]
    assert doc["wrong_version"]["count"] == 0, doc["wrong_version"]
    assert doc["lost_reports"]["count"] == 0, doc["lost_reports"]
    assert doc["controller_kills"] == 1 and doc["agent_restarts"] >= 4 * doc["churn_rounds"] > 0
    assert doc["errors"]["crashed"] == 0
    assert doc["controller_rss"]["baseline_bytes"] > 0 and doc["rss_growth_ratio"] > 0
    assert doc["baseline_install_s"] > 0 and doc["churn_converge_ratio"] >= 0
