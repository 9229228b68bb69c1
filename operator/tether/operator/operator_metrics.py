"""Prometheus metrics of the operator (`tether_operator_*`), served by `tether operator --metrics-port`.

- reconciles by trigger (change, poll, delete) and outcome (ok, error), and their duration;
- MLTasks by phase and staged rollouts by phase, read at scrape time from what the
  handlers last wrote (a collector over a small dict, so a scrape costs the number of tasks);
- gate evaluations by gate and verdict (Passed, Failed, Waiting), one per gate of the current
  stage each time the operator judged it on fresh health from the controller.

Updated by the Kopf handlers only; the pure rooms know nothing of it.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import prometheus_client
from prometheus_client import metrics_core
from prometheus_client import registry as registry_mod

from tether.common import exposition
from tether.operator import task_status


class _Phases(registry_mod.Collector):
    def __init__(self) -> None:
        self.tasks: dict[tuple[str, str], tuple[str, str | None]] = {}  # (ns, name) -> (task phase, rollout phase)

    def collect(self) -> Iterator[metrics_core.Metric]:
        snapshot = list(self.tasks.values())  # one C-level copy: safe against the handlers' updates
        tasks = metrics_core.GaugeMetricFamily("tether_operator_mltasks", "MLTasks by phase", labels=["phase"])
        for phase, n in sorted(collections.Counter(p for p, _ in snapshot).items()):
            tasks.add_metric([phase], n)
        rollouts = metrics_core.GaugeMetricFamily(
            "tether_operator_rollouts",
            "Staged rollouts by phase (Progressing, Paused, Completed, RolledBack)",
            labels=["phase"],
        )
        counts = collections.Counter(r for _, r in snapshot if r is not None)
        for phase in task_status.RolloutPhase:
            rollouts.add_metric([phase.value], counts.get(phase.value, 0))
        yield tasks
        yield rollouts


class OperatorMetrics:
    def __init__(self, registry: registry_mod.CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else exposition.new_registry()
        self.reconciles = prometheus_client.Counter(
            "tether_operator_reconciles", "Reconciles by trigger and outcome", ["trigger", "outcome"], registry=r
        )
        self.duration = prometheus_client.Histogram(
            "tether_operator_reconcile_duration_seconds",
            "Time of one reconcile (controller calls included)",
            ["trigger"],
            registry=r,
        )
        self.gates = prometheus_client.Counter(
            "tether_operator_gate_evaluations",
            "Gate evaluations of the current stage, by gate and verdict",
            ["gate", "state"],
            registry=r,
        )
        self._phases = _Phases()
        r.register(self._phases)

    def task_status(self, *, namespace: str, name: str, status: task_status.MLTaskStatus, judged: bool) -> None:
        """What a reconcile wrote; `judged`: the gates were evaluated on health read from the controller."""
        rollout = status.rollout
        phase = status.phase.value if status.phase is not None else "Unknown"
        self._phases.tasks[(namespace, name)] = (phase, rollout.phase.value if rollout is not None else None)
        if judged and rollout is not None and rollout.current_stage < len(rollout.stages):
            for gate in rollout.stages[rollout.current_stage].gates:
                self.gates.labels(gate.metric, gate.state.value).inc()

    def forget(self, *, namespace: str, name: str) -> None:
        self._phases.tasks.pop((namespace, name), None)
