"""The chart for production: TLS by default, scoped NetworkPolicies, gRPC health probes, PDBs, operator HA.

Every rendering below is validated against the Kubernetes OpenAPI schemas, offline
(`kubernetes-validate` ships them), in strict mode: an unknown or misplaced field fails.
"""

from __future__ import annotations

import base64
import pathlib
from typing import Any

import chart_support as helm_tool
import kubernetes_validate
import pytest
import yaml
from chart_support import CHART
from cryptography import x509
from test_chart import by_kind, render

K8S_VERSION = "1.30.0"  # the oldest Kubernetes the chart supports (native grpc probes are GA since 1.27)
# Kinds of CRDs, which the Kubernetes schemas do not know: cert-manager, prometheus-operator, ours, Kopf's.
CUSTOM_KINDS = {"Certificate", "ServiceMonitor", "MLTask", "ClusterKopfPeering", "KopfPeering"}

CONFIGURATIONS = {
    "default": ["--include-crds"],
    "cert-manager": ["--set", "controller.tls.certManager.enabled=true,controller.tls.certManager.issuerRef.name=ca"],
    "tls-off": ["--set", "controller.tls.enabled=false,operator.replicas=1,podDisruptionBudget.enabled=false"],
    "namespaced-ha": ["--set", "operator.watchNamespaces={ml,edge},operator.replicas=3"],
    "external-s3-replicas": [
        "--set", "postgresql.enabled=false,externalDatabase.url=postgresql://db/tether,redis.enabled=false",
        "--set", "externalBroker.url=redis://broker:6379/0,controller.replicas=3,controller.blobs.store=s3",
        "--set", "controller.blobs.s3.bucket=blobs,controller.tls.requireClientCerts=true",
        "--set", "operator.tls.clientSecretName=op-client,controller.service.type=LoadBalancer",
    ],
    "metrics-and-sources": [
        "--set", "metrics.serviceMonitor.enabled=true,metrics.grafanaDashboard.enabled=true",
        "--set", "networkPolicy.agentSources[0].ipBlock.cidr=203.0.113.0/24",
        "--set", "controller.tls.dnsNames={tether.example.com},controller.tls.ipAddresses={203.0.113.7}",
    ],
}  # fmt: skip


def validate(docs: list[dict[str, Any]]) -> set[str]:
    """Validate every built-in object strictly; return the custom kinds left out."""
    skipped = set()
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            skipped.add(doc["kind"])
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    return skipped


@pytest.mark.parametrize("name", sorted(CONFIGURATIONS))
def test_rendered_manifests_are_valid_kubernetes_objects(helm: pathlib.Path, name: str) -> None:
    docs = render(helm, *CONFIGURATIONS[name])
    assert len(docs) > 10
    validate(docs)


def test_the_validator_catches_a_misplaced_field(helm: pathlib.Path) -> None:
    docs = render(helm)
    deployment = by_kind(docs, "Deployment")["tether-controller"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["host"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def certificate(pem_b64: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(base64.b64decode(pem_b64))


def test_tls_is_on_by_default_with_a_generated_ca(helm: pathlib.Path) -> None:
    docs = render(helm, *CONFIGURATIONS["metrics-and-sources"])
    secret = by_kind(docs, "Secret")["tether-controller-tls"]
    assert secret["type"] == "kubernetes.io/tls"
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    ca, cert = certificate(secret["data"]["ca.crt"]), certificate(secret["data"]["tls.crt"])
    assert cert.issuer == ca.subject and ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca)  # the signature too
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) >= {
        "tether-controller.tether.svc",
        "tether-controller.tether.svc.cluster.local",
        "tether.example.com",
    }
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["203.0.113.7"]

    controller = by_kind(docs, "Deployment")["tether-controller"]["spec"]["template"]["spec"]
    args = controller["containers"][0]["args"]
    assert {"--tls-cert=/etc/tether/tls/tls.crt", "--tls-key=/etc/tether/tls/tls.key"} <= set(args)
    assert {"name": "tls", "secret": {"secretName": "tether-controller-tls", "defaultMode": 0o440}} in controller[
        "volumes"
    ]
    operator = by_kind(docs, "Deployment")["tether-operator"]["spec"]["template"]["spec"]
    assert "--ca-file=/etc/tether/tls/ca.crt" in operator["containers"][0]["args"]
    ca_volume = next(v for v in operator["volumes"] if v["name"] == "controller-ca")
    only_the_ca = [{"key": "ca.crt", "path": "ca.crt"}]
    assert ca_volume["secret"] == {"secretName": "tether-controller-tls", "items": only_the_ca}


def test_cert_manager_issues_the_certificate_when_enabled(helm: pathlib.Path) -> None:
    docs = render(helm, *CONFIGURATIONS["cert-manager"])
    assert "tether-controller-tls" not in by_kind(docs, "Secret")  # cert-manager writes it
    cert = by_kind(docs, "Certificate")["tether-controller-tls"]
    assert cert["spec"]["secretName"] == "tether-controller-tls"
    assert cert["spec"]["issuerRef"] == {"name": "ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert "tether-controller.tether.svc" in cert["spec"]["dnsNames"]
    result = helm_tool.run_helm(
        helm, "template", "tether", str(CHART), "--set", "controller.tls.certManager.enabled=true", check=False
    )
    assert result.returncode != 0 and "/controller/tls/certManager/issuerRef/name" in result.stderr, result.stderr


def test_a_given_secret_is_used_as_is_and_tls_can_be_turned_off(helm: pathlib.Path) -> None:
    docs = render(helm, "--set", "controller.tls.secretName=mine")
    assert "tether-controller-tls" not in by_kind(docs, "Secret") and not by_kind(docs, "Certificate")
    volumes = by_kind(docs, "Deployment")["tether-controller"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "tls", "secret": {"secretName": "mine", "defaultMode": 0o440}} in volumes

    docs = render(helm, "--set", "controller.tls.enabled=false")
    assert "tether-controller-tls" not in by_kind(docs, "Secret")
    args = by_kind(docs, "Deployment")["tether-controller"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not any(a.startswith("--tls-") for a in args)
    result = helm_tool.run_helm(
        helm,
        "template",
        "tether",
        str(CHART),
        "--set",
        "controller.tls.enabled=false,controller.tls.requireClientCerts=true,operator.tls.clientSecretName=c",
        check=False,
    )
    assert result.returncode != 0 and "requireClientCerts needs controller.tls.enabled" in result.stderr


def test_controller_probes_ask_the_grpc_health_service(helm: pathlib.Path) -> None:
    container = by_kind(render(helm), "Deployment")["tether-controller"]["spec"]["template"]["spec"]["containers"][0]
    assert "--health-port=8081" in container["args"]
    assert {"name": "health", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 8081}, probe
    service = by_kind(render(helm), "Service")["tether-controller"]
    assert [p["name"] for p in service["spec"]["ports"]] == ["grpc"]  # the health port stays in the pod


def test_pod_disruption_budgets(helm: pathlib.Path) -> None:
    budgets = by_kind(render(helm), "PodDisruptionBudget")
    assert set(budgets) == {"tether-controller", "tether-operator", "tether-worker"}
    for name, budget in budgets.items():
        assert budget["spec"]["maxUnavailable"] == 1, name
        assert budget["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == name.split("-")[1]
    assert not by_kind(render(helm, "--set", "podDisruptionBudget.enabled=false"), "PodDisruptionBudget")
    none_for_zero = by_kind(render(helm, "--set", "worker.replicas=0,operator.enabled=false"), "PodDisruptionBudget")
    assert set(none_for_zero) == {"tether-controller"}


def test_two_operators_one_active_through_kopf_peering(helm: pathlib.Path) -> None:
    docs = render(helm, "--include-crds")
    deployment = by_kind(docs, "Deployment")["tether-operator"]
    assert deployment["spec"]["replicas"] == 2 and "strategy" not in deployment["spec"]
    assert "--peering=tether-operator" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert set(by_kind(docs, "ClusterKopfPeering")) == {"tether-operator"}
    crds = {d["metadata"]["name"] for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"} <= crds
    role = by_kind(docs, "ClusterRole")["tether-operator-peering"]
    assert {r for rule in role["rules"] for r in rule["resources"]} == {"clusterkopfpeerings"}
    assert {v for rule in role["rules"] for v in rule["verbs"]} == {"get", "patch", "list", "watch"}
    binding = by_kind(docs, "ClusterRoleBinding")["tether-operator-peering"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tether-operator", "namespace": "tether"}]

    namespaced = render(helm, *CONFIGURATIONS["namespaced-ha"])
    peerings = [d for d in namespaced if d["kind"] == "KopfPeering"]
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["edge", "ml"]
    assert not by_kind(namespaced, "ClusterKopfPeering") and not by_kind(namespaced, "ClusterRole")

    single = render(helm, "--set", "operator.replicas=1")
    deployment = by_kind(single, "Deployment")["tether-operator"]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # never two standalone operators at once
    assert not any(a.startswith("--peering") for a in deployment["spec"]["template"]["spec"]["containers"][0]["args"])
    assert not by_kind(single, "ClusterKopfPeering")


def test_network_policies_open_nothing_to_the_world_by_default(helm: pathlib.Path) -> None:
    docs = render(helm)
    assert "0.0.0.0/0" not in yaml.safe_dump_all(docs)
    policies = by_kind(docs, "NetworkPolicy")
    assert set(policies) == {f"tether-{c}" for c in ("controller", "operator", "worker", "postgresql", "redis")}
    grpc_rule = policies["tether-controller"]["spec"]["ingress"][0]
    assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert [s["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for s in grpc_rule["from"]] == ["operator"]
    for name in ("tether-operator", "tether-worker"):
        spec = policies[name]["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        metrics_only = {"ports": [{"port": "metrics", "protocol": "TCP"}], "from": [{"namespaceSelector": {}}]}
        assert spec["ingress"] == [metrics_only]
    no_metrics = by_kind(render(helm, "--set", "metrics.enabled=false"), "NetworkPolicy")
    assert no_metrics["tether-worker"]["spec"]["ingress"] == []

    opened = by_kind(render(helm, *CONFIGURATIONS["metrics-and-sources"]), "NetworkPolicy")
    sources = opened["tether-controller"]["spec"]["ingress"][0]["from"]
    assert {"ipBlock": {"cidr": "203.0.113.0/24"}} in sources


def test_agent_sources_are_checked(helm: pathlib.Path) -> None:
    result = helm_tool.run_helm(
        helm, "template", "tether", str(CHART), "--set", "networkPolicy.agentSources[0].cidr=10.0.0.0/8", check=False
    )
    assert result.returncode != 0 and "/networkPolicy/agentSources/0" in result.stderr, result.stderr


def notes(helm: pathlib.Path, *args: str) -> str:
    result = helm_tool.run_helm(helm, "install", "tether", str(CHART), "--namespace", "tether", "--dry-run", *args)
    return result.stdout.split("NOTES:", 1)[1]


def test_notes_say_how_devices_and_the_cli_reach_the_controller(helm: pathlib.Path) -> None:
    text = notes(helm)
    assert "kubectl -n tether port-forward service/tether-controller 7443:7443" in text
    assert "get secret tether-controller-tls -o jsonpath='{.data.ca\\.crt}'" in text
    assert "backend-protocol: GRPCS" in text and "LoadBalancer" in text
    assert "no device can reach the controller yet" in text  # agentSources is empty
    text = notes(
        helm, "--set", "controller.service.type=LoadBalancer,networkPolicy.agentSources[0].ipBlock.cidr=1.2.3.0/24"
    )
    assert "jsonpath='{.status.loadBalancer.ingress[0]}'" in text and "port-forward" not in text
    assert "no device can reach" not in text
    assert "TLS is off" in notes(helm, "--set", "controller.tls.enabled=false")


def test_the_generated_key_belongs_to_the_certificate(helm: pathlib.Path) -> None:
    from cryptography.hazmat.primitives import serialization

    secret = by_kind(render(helm), "Secret")["tether-controller-tls"]
    key = serialization.load_pem_private_key(base64.b64decode(secret["data"]["tls.key"]), password=None)
    public = certificate(secret["data"]["tls.crt"]).public_key()
    pem = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(*pem) == public.public_bytes(*pem)
