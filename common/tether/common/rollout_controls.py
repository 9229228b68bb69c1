"""Rollout controls: pause, resume, promote and abort a staged rollout by patching its MLTask.

One definition for every caller that steers a rollout (`tether rollout ...`, the dashboard's
controls): each action is a JSON merge patch of the MLTask object, sent through the Kubernetes
API with the caller's own credentials (so the cluster's RBAC decides who may), and the operator
acts on it:
- pause:   `spec.paused: true` (the current stage holds; nothing new is pushed);
- resume:  `spec.paused: false` plus the `tether.dev/resume` annotation (a
           rollout paused by a failed gate restarts its stage's bake);
- promote: the `tether.dev/promote` annotation (skip the rest of the current
           stage's bake and gates);
- abort:   the `tether.dev/abort` annotation (every device goes back to the
           previous version, or a first release is uninstalled).

Annotations carry a timestamp, so asking twice acts twice; the operator
records each value it acted on in `status.rollout.handled`.
"""

from __future__ import annotations

import datetime
from typing import Any

from tether.common import errors

GROUP = "tether.dev"
ACTIONS = ("pause", "resume", "promote", "abort")
ANNOTATIONS = {"promote": f"{GROUP}/promote", "abort": f"{GROUP}/abort", "resume": f"{GROUP}/resume"}
PAST = {"pause": "paused", "resume": "resumed", "promote": "promotion requested", "abort": "abort requested"}


def patch_for(action: str, *, now: datetime.datetime) -> dict[str, Any]:
    """The merge patch each action sends."""
    stamp = now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if action == "pause":
        return {"spec": {"paused": True}}
    if action == "resume":
        return {"spec": {"paused": False}, "metadata": {"annotations": {ANNOTATIONS["resume"]: stamp}}}
    if action in ("promote", "abort"):
        return {"metadata": {"annotations": {ANNOTATIONS[action]: stamp}}}
    raise errors.InvalidArgument(f"unknown rollout action {action!r}")


def split(task: str, namespace: str | None, default: str) -> tuple[str, str]:
    """`ns/name` or `name` (in `namespace`, else `default`) → (namespace, name)."""
    if "/" in task:
        ns, name = task.split("/", 1)
        return ns, name
    return namespace or default, task


async def apply(client: Any, action: str, namespace: str, name: str, *, now: datetime.datetime | None = None) -> str:
    """Send `action`'s patch through `client` (a `kube.KubeClient`); the one-line outcome."""
    patch = patch_for(action, now=now or datetime.datetime.now(datetime.UTC))
    await client.patch_mltask(namespace, name, patch)
    return f"mltask {namespace}/{name}: {PAST[action]}"
