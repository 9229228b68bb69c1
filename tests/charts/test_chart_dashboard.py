"""The chart's dashboard option: off by default; when on, a Deployment, Service, Secret, RBAC and NetworkPolicy."""

from __future__ import annotations

import pathlib
from typing import Any

import chart_support as helm_tool
import kubernetes_validate
import pytest
import yaml
from chart_support import CHART

ON = ("--set", "dashboard.enabled=true")


def render(helm: pathlib.Path, *args: str) -> list[dict[str, Any]]:
    out = helm_tool.run_helm(helm, "template", "tether", str(CHART), "--namespace", "tether", *args)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def named(docs: list[dict[str, Any]], kind: str, name: str = "tether-dashboard") -> dict[str, Any] | None:
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)


def test_off_by_default(helm: pathlib.Path) -> None:
    docs = render(helm)
    assert not [d for d in docs if d["metadata"]["name"].startswith("tether-dashboard")]


def test_on_it_serves_beside_the_controller_read_only(helm: pathlib.Path) -> None:
    docs = render(helm, *ON)
    deployment = named(docs, "Deployment")
    assert deployment is not None
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["tether", "dashboard"]
    args = container["args"]
    assert "--controller=tether-controller.tether.svc:7443" in args and "--host=0.0.0.0" in args
    assert "--token-file=/etc/tether/dashboard/token" in args and "--namespace=*" in args and "--auth=token" in args
    assert "--allow-controls" not in args and "--ca-file=/etc/tether/tls/ca.crt" in args  # TLS on by default
    env = {e["name"]: e for e in container["env"]}
    assert env["TETHER_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "tether-auth", "key": "admin-token"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["serviceAccountName"] == "tether-dashboard"
    service = named(docs, "Service")
    assert service is not None and service["spec"]["ports"][0]["targetPort"] == "http"
    secret = named(docs, "Secret")
    assert secret is not None and set(secret["data"]) == {"token", "session-key"}
    role = named(docs, "ClusterRole")
    assert role is not None
    verbs = {tuple(r["resources"]): set(r["verbs"]) for r in role["rules"]}
    assert verbs == {("mltasks",): {"get", "list", "watch"}, ("events",): {"get", "list", "watch"}}
    for doc in docs:
        if doc["metadata"]["name"] == "tether-dashboard":
            kubernetes_validate.validate(doc, "1.30", strict=True)


def test_controls_grant_patch_and_namespaces_get_roles(helm: pathlib.Path) -> None:
    docs = render(helm, *ON, "--set", "dashboard.allowControls=true", "--set", "dashboard.namespaces={ml,edge}")
    roles = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "tether-dashboard"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["edge", "ml"]
    assert "patch" in roles[0]["rules"][0]["verbs"] and "patch" not in roles[0]["rules"][1]["verbs"]
    assert named(docs, "ClusterRole") is None
    args = named(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]  # type: ignore[index]
    assert "--allow-controls" in args and "--namespace=ml" in args and "--namespace=edge" in args


def test_network_policies_let_the_dashboard_reach_the_controller_and_nobody_reach_it(helm: pathlib.Path) -> None:
    docs = render(helm, *ON)
    controller = named(docs, "NetworkPolicy", "tether-controller")
    assert controller is not None
    sources = controller["spec"]["ingress"][0]["from"]
    assert any(s.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "dashboard"
               for s in sources)  # fmt: skip
    own = named(docs, "NetworkPolicy")
    assert own is not None and own["spec"]["ingress"] == []
    opened = render(
        helm, *ON, "--set-json", 'dashboard.ingressSources=[{"namespaceSelector":{"matchLabels":{"a":"b"}}}]'
    )
    own = named(opened, "NetworkPolicy")
    assert own is not None and own["spec"]["ingress"][0]["from"][0]["namespaceSelector"]


def test_kubernetes_auth_never_lets_the_dashboard_account_patch(helm: pathlib.Path) -> None:
    docs = render(helm, *ON, "--set", "dashboard.allowControls=true", "--set", "dashboard.auth=kubernetes")
    role = named(docs, "ClusterRole")
    assert role is not None and all("patch" not in r["verbs"] for r in role["rules"])
    args = named(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]  # type: ignore[index]
    assert "--auth=kubernetes" in args and "--allow-controls" in args


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--set", "dashboard.token=short"), "/dashboard/token"),
        (("--set", "dashboard.pollIntervalSeconds=0"), "/dashboard/pollIntervalSeconds"),
        (("--set", "dashboard.namespaces={Bad_NS}"), "/dashboard/namespaces"),
        (("--set", "dashboard.colour=red"), "colour"),
        (("--set", "dashboard.auth=oidc"), "/dashboard/auth"),
    ],
)
def test_bad_dashboard_values_are_refused(helm: pathlib.Path, args: tuple[str, ...], words: str) -> None:
    result = helm_tool.run_helm(helm, "template", "tether", str(CHART), *ON, *args, check=False)
    assert result.returncode != 0 and words in result.stderr, result.stderr
