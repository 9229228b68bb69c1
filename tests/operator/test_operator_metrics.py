"""The operator's Prometheus metrics, scraped over HTTP while Kopf reconciles on the emulator; and Kopf's
login through an `exec` credential plugin (the official client's kubeconfig handling)."""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import yaml
from metrics_support import scrape, value
from operator_helpers import mltask, running_operator, wait_for
from test_rollout_kopf import STAGES, HealthAdmin, rollout_status

from tether.common import exposition
from tether.devtools.emulator import EmulatedCluster
from tether.operator import operator_metrics


async def test_reconciles_phases_and_gate_evaluations_move(cluster: EmulatedCluster) -> None:
    metrics = operator_metrics.OperatorMetrics()
    server = exposition.serve(metrics.registry, port=0, host="127.0.0.1")
    admin = HealthAdmin()
    try:
        async with running_operator(cluster, admin, metrics=metrics):
            await cluster.create(mltask("staged", rollout={"stages": STAGES}))

            async def progressing() -> dict[str, Any] | None:
                r = await rollout_status(cluster, "staged")
                return r if r.get("phase") == "Progressing" else None

            await wait_for(progressing, what="a progressing rollout")
            admin.eligible = 5

            async def judged() -> dict[str, Any] | None:
                samples = await scrape(server.url)
                gate = ("tether_operator_gate_evaluations_total", (("gate", "errorRate"), ("state", "Waiting")))
                return samples if samples.get(gate, 0) >= 1 else None

            samples = await wait_for(judged, what="a gate evaluation")  # no error rate reported yet: it waits
            assert value(samples, "tether_operator_reconciles_total", trigger="change", outcome="ok") >= 1
            assert value(samples, "tether_operator_reconciles_total", trigger="poll", outcome="ok") >= 1
            assert value(samples, "tether_operator_reconcile_duration_seconds_count", trigger="poll") >= 1
            assert value(samples, "tether_operator_rollouts", phase="Progressing") == 1
            assert value(samples, "tether_operator_rollouts", phase="Completed") == 0
            assert value(samples, "tether_operator_mltasks", phase="Progressing") == 1

            await cluster.delete(None, "staged")

            async def forgotten() -> dict[str, Any] | None:
                samples = await scrape(server.url)
                return samples if value(samples, "tether_operator_rollouts", phase="Progressing") == 0 else None

            samples = await wait_for(forgotten, what="the deleted task leaving the gauges")
            assert value(samples, "tether_operator_reconciles_total", trigger="delete", outcome="ok") == 1
    finally:
        server.stop()


async def test_kopf_logs_in_through_an_exec_plugin(cluster: EmulatedCluster, tmp_path: pathlib.Path) -> None:
    """The emulator's kubeconfig with its token replaced by a plugin that prints it: Kopf watches and patches."""
    doc = yaml.safe_load(cluster.kubeconfig_path.read_text())
    script = tmp_path / "plugin.py"
    script.write_text(
        "import json\nprint(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1', 'kind': 'ExecCredential',"
        " 'status': {'token': 'emulator'}}))\n"
    )
    doc["users"][0]["user"] = {
        "exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable, "args": [str(script)]}
    }
    kubeconfig = tmp_path / "exec-kubeconfig.yaml"
    kubeconfig.write_text(yaml.safe_dump(doc))
    admin = HealthAdmin()
    async with running_operator(cluster, admin, kubeconfig=kubeconfig):
        await cluster.create(mltask("via-exec"))

        async def applied() -> dict[str, Any] | None:
            obj = await cluster.get(None, "via-exec")
            return obj if ((obj or {}).get("status") or {}).get("release") else None

        await wait_for(applied, what="the task applied by an operator logged in with an exec plugin")
