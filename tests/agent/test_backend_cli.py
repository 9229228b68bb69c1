"""`tether agent backends` (--json), and the `tether bench` group's lazy subcommands."""

from __future__ import annotations

import json

from click.testing import CliRunner

from tether.agent import backends, profile, selection
from tether.cli.main import cli


def test_agent_backends_json_shows_profile_and_cached_choices(tmp_path) -> None:
    state = tmp_path / "state"
    here = profile.collect(backends=None, measure=False)
    chosen = selection.Selection(
        model_key="sha256:" + "a" * 64,
        fingerprint=here.fingerprint,
        chosen=selection.Candidate("mnn", "cpu", 1, "high"),
        latency_ms=0.012,
        measurements=(selection.Measurement(selection.Candidate("mnn", "cpu", 1, "high"), 0.012, reps=50),),
        created_at=2.0,
    )
    stale = selection.Selection(
        model_key="sha256:" + "b" * 64,
        fingerprint="sha256:another-device",
        chosen=selection.Candidate("onnxruntime", "cpu", 2, "fp32"),
        latency_ms=1.5,
        created_at=1.0,
    )
    cache = backends.SelectionCache(state / backends.CACHE_FILE)
    cache.put(chosen)
    cache.put(stale)
    result = CliRunner().invoke(cli, ["agent", "backends", "--state-dir", str(state), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output.strip().splitlines()[-1])
    assert "mnn/cpu" in doc["backends"] and doc["fingerprint"] == here.fingerprint
    assert doc["profile"]["cores"] >= 1 and doc["profile"]["engines"]["mnn"]
    (current, old) = doc["models"]
    assert current["chosen"] == "mnn/cpu/t1/high" and current["latency_ms"] == 0.012 and current["current"]
    assert current["measurements"][0]["reps"] == 50
    assert old["chosen"] == "onnxruntime/cpu/t2/fp32" and not old["current"]

    table = CliRunner().invoke(cli, ["agent", "backends", "--state-dir", str(state)])
    assert table.exit_code == 0 and "mnn/cpu/t1/high" in table.output and "device changed" in table.output


def test_bench_group_lists_benchmarks_lazily() -> None:
    result = CliRunner().invoke(cli, ["bench", "--help"])
    assert result.exit_code == 0 and "runtime" in result.output
    result = CliRunner().invoke(cli, ["bench", "runtime", "--help"])
    assert result.exit_code == 0 and "--out" in result.output and "--budget" in result.output
