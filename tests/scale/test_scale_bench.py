"""`tether bench fleet` at toy size: every key is written, with its baseline, and the ratios make sense."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tether.cli import bench
from tether.devtools import bench_figures, origin

KEYS = (
    "max_connected_agents",
    "server_rss_bytes_per_agent",
    "notify_s",
    "install_s",
    "polling_install_ratio",
    "polling_idle_load_ratio",
    "push_full_bytes_ratio",
    "one_file_bytes_ratio",
)


def test_the_fleet_benchmark_writes_every_key_with_a_baseline(tmp_path, database_url, broker_url):
    out = tmp_path / "fleet.json"
    result = CliRunner().invoke(
        bench.bench,
        [
            "fleet",
            "--agents", "6",
            "--processes", "1",
            "--poll-agents", "3",
            "--poll-interval", "1",
            "--full-agents", "2",
            "--idle", "0.5",
            "--model-kib", "16",
            "--database-url", database_url,
            "--broker-url", broker_url,
            "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    for key in KEYS:
        assert key in doc, key
        assert key in doc["baselines"], key
    assert doc["max_connected_agents"] == 6
    for key in ("notify_s", "install_s"):
        assert doc[key]["n"] == 6 and 0 < doc[key]["p50"] <= doc[key]["p90"] <= doc[key]["p100"]
    assert doc["install_s"]["p50"] >= doc["notify_s"]["p50"]
    # One changed 16 KiB file moves about 16 KiB (manifest, notify and reports on top); the whole
    # bundle moves more; polling a 1 s interval takes longer than a push.
    assert 1.0 < doc["one_file_bytes_ratio"] < 1.3
    assert 0 < doc["push_full_bytes_ratio"] < 1.0
    assert doc["polling_install_ratio"] > 0
    assert doc["baselines"]["polling_install_ratio"]["polling_agents"] == 3


@pytest.mark.skipif(origin.nginx_binary() is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_both_blob_modes_in_one_run_compare_the_controller_cost_per_install(tmp_path, database_url, broker_url):
    out = tmp_path / "fleet.json"
    result = CliRunner().invoke(
        bench.bench,
        [
            "fleet",
            "--blobs", "both",
            "--agents", "6",
            "--processes", "1",
            "--poll-agents", "0",
            "--full-agents", "2",
            "--idle", "0.5",
            "--model-kib", "16",
            "--database-url", database_url,
            "--broker-url", broker_url,
            "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["blobs"] == "both"
    for mode in ("grpc", "http"):
        run = doc[mode]
        assert run["blobs"] == mode
        for key in ("max_connected_agents", "notify_s", "install_s", "one_file_bytes_ratio", "push_full_bytes_ratio"):
            assert key in run, (mode, key)
        assert run["install_s"]["n"] == 6
        assert run["controller_cpu_s_per_install"] > 0 and run["controller_bytes_per_install"] > 0
        # Bytes moved count the origin's too: one changed 16 KiB file still moves about 16 KiB.
        assert 1.0 < run["one_file_bytes_ratio"] < 1.3, mode
    grpc_run, http_run = doc["grpc"], doc["http"]
    assert grpc_run["details"]["http"]["blobs_fetched"] == 0 and grpc_run["details"]["v1"]["origin_requests"] == 0
    # By URL: every blob came from nginx, none failed, and the controller served no blob bytes.
    assert http_run["details"]["http"]["blobs_fetched"] > 0 and http_run["details"]["http"]["url_failures"] == 0
    assert http_run["details"]["v1"]["origin_bytes_per_agent"] >= http_run["details"]["v1"]["bundle_bytes"]
    assert http_run["controller_bytes_per_install"] < 16 * 1024 < grpc_run["controller_bytes_per_install"]
    assert doc["cpu_per_install_ratio"] == bench_figures.ratio(
        http_run["controller_cpu_s_per_install"], grpc_run["controller_cpu_s_per_install"]
    )


def test_the_blob_modes_compare_by_http_over_grpc():
    doc = bench_figures.compare_modes(
        {
            "grpc": {
                "controller_cpu_s_per_install": 0.004,
                "controller_bytes_per_install": 70_000,
                "install_s": {"p50": 2.0},
            },
            "http": {
                "controller_cpu_s_per_install": 0.001,
                "controller_bytes_per_install": 1_750,
                "install_s": {"p50": 1.0},
            },
        }
    )
    assert doc["cpu_per_install_ratio"] == 0.25 and doc["goals"]["cpu_per_install_ratio_le_0.3"]
    assert doc["bytes_per_install_ratio"] == 0.025 and doc["install_p50_ratio"] == 0.5
    assert doc["grpc"]["controller_bytes_per_install"] == 70_000


def test_percentiles_and_the_polling_model():
    p = bench_figures.percentiles([float(i) for i in range(1, 11)])
    assert (p["p50"], p["p90"], p["p100"], p["n"]) == (5.0, 9.0, 10.0, 10)
    assert bench_figures.percentiles([])["n"] == 0
    model = bench_figures.modelled_polling_install(interval_s=30, pull_s=[0.1], n=10_000)
    assert 14 < model["p50"] < 16 and 26.5 < model["p90"] < 27.5 and model["p100"] <= 30.1
    assert bench_figures.ratio(1, 4) == 0.25


def test_observability_both_measures_on_against_off(tmp_path, database_url, broker_url):
    out = tmp_path / "fleet-obs.json"
    result = CliRunner().invoke(
        bench.bench,
        [
            "fleet",
            "--agents", "4",
            "--processes", "1",
            "--poll-agents", "0",
            "--full-agents", "1",
            "--idle", "0.2",
            "--model-kib", "4",
            "--database-url", database_url,
            "--broker-url", broker_url,
            "--observability", "both",
            "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["observability_install_ratio"] > 0 and doc["observability_cpu_ratio"] > 0
    seen = doc["baselines"]["observability_cpu_ratio"]
    assert (
        seen is doc["baselines"]["observability_install_ratio"]
        or seen == doc["baselines"]["observability_install_ratio"]
    )
    assert seen["off"]["installs_per_s"] > 0 and seen["on"]["installs_per_s"] > 0
    assert seen["metrics_scrapes"] >= 1 and seen["metrics_bytes_per_scrape"] > 1000
    assert seen["spans_exported"] >= 2  # ApplyRelease of v1 and v2 at least, received over OTLP
    assert "observability_install_ratio_ge_0.95" in doc["goals"]


def test_observability_cannot_go_with_connect_only():
    result = CliRunner().invoke(bench.bench, ["fleet", "--connect-only", "--observability", "both"])
    assert result.exit_code != 0 and "--connect-only" in result.output
