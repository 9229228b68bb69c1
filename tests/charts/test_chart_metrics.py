"""The chart exposes every component's /metrics; ServiceMonitor and Grafana dashboard when enabled."""

from __future__ import annotations

import json
import pathlib
import re

import chart_support as helm_tool
import pytest
from chart_support import CHART
from prometheus_client import CollectorRegistry
from test_chart import by_kind, render

COMPONENTS = ("tether-controller", "tether-operator", "tether-worker")
DASHBOARD = CHART / "dashboards" / "tether.json"


def test_every_component_serves_metrics_on_a_named_port(helm: pathlib.Path) -> None:
    docs = render(helm)
    deployments = by_kind(docs, "Deployment")
    for name in COMPONENTS:
        pod = deployments[name]["spec"]["template"]
        container = pod["spec"]["containers"][0]
        assert "--metrics-port=9464" in container["args"], name
        assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in container["ports"], name
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9464", name
    controller_policy = by_kind(docs, "NetworkPolicy")["tether-controller"]["spec"]["ingress"]
    assert {"ports": [{"port": "metrics", "protocol": "TCP"}], "from": [{"namespaceSelector": {}}]} in controller_policy
    assert not by_kind(docs, "ServiceMonitor") and not by_kind(docs, "ConfigMap")

    off = by_kind(render(helm, "--set", "metrics.enabled=false"), "Deployment")
    for name in COMPONENTS:
        container = off[name]["spec"]["template"]["spec"]["containers"][0]
        assert not any(a.startswith("--metrics-port") for a in container["args"]), name


def test_service_monitor_and_dashboard_when_enabled(helm: pathlib.Path) -> None:
    docs = render(
        helm,
        "--set",
        "metrics.serviceMonitor.enabled=true,metrics.serviceMonitor.labels.release=prom,"
        "metrics.grafanaDashboard.enabled=true",
    )
    monitor = by_kind(docs, "ServiceMonitor")["tether"]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    service = by_kind(docs, "Service")["tether-metrics"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["labels"].items() >= monitor["spec"]["selector"]["matchLabels"].items()
    dashboard = by_kind(docs, "ConfigMap")["tether-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["tether.json"]) == json.loads(DASHBOARD.read_text())


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--set", "metrics.port=0"], "/metrics/port"),
        (["--set", "metrics.serviceMonitor.interval=often"], "/metrics/serviceMonitor/interval"),
    ],
)
def test_bad_metrics_values_are_refused(helm: pathlib.Path, args: list[str], words: str) -> None:
    result = helm_tool.run_helm(helm, "template", "tether", str(CHART), *args, check=False)
    assert result.returncode != 0
    assert words in result.stderr, result.stderr


def _exported_names() -> set[str]:
    from tether.controller import instruments
    from tether.operator import operator_metrics

    registries = [instruments.ControllerMetrics().registry, operator_metrics.OperatorMetrics().registry]
    worker = CollectorRegistry()
    instruments.WorkerMetrics(worker)
    registries.append(worker)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    return {
        family.name + suffix
        for registry in registries
        for family in registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


def test_the_dashboard_plots_only_metrics_the_components_export() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\b((?:tether|process)_[a-z_]+)\{", e)}
    assert len(used) >= 20
    assert used - _exported_names() == set()
    # Every component has a section.
    assert {p["title"] for p in dashboard["panels"] if p["type"] == "row"} == {
        "Controller",
        "Operator",
        "Aggregation worker",
    }
