"""`tether bench fleet` at toy size: every key is written, with its baseline, and the ratios make sense."""

from __future__ import annotations

import json

from click.testing import CliRunner

from tether.cli import bench
from tether.devtools import bench_fleet

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


def test_percentiles_and_the_polling_model():
    p = bench_fleet.percentiles([float(i) for i in range(1, 11)])
    assert (p["p50"], p["p90"], p["p100"], p["n"]) == (5.0, 9.0, 10.0, 10)
    assert bench_fleet.percentiles([])["n"] == 0
    model = bench_fleet.modelled_polling_install(interval_s=30, pull_s=[0.1], n=10_000)
    assert 14 < model["p50"] < 16 and 26.5 < model["p90"] < 27.5 and model["p100"] <= 30.1
    assert bench_fleet.ratio(1, 4) == 0.25


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
