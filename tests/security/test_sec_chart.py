"""The Helm chart's security settings: TLS, mTLS, credential signing keys, required bundle signatures."""

from __future__ import annotations

import pathlib
from typing import Any

import chart_support as helm_tool
import pytest
import yaml
from chart_support import CHART


def deployments(helm: pathlib.Path, *args: str) -> dict[str, dict[str, Any]]:
    out = helm_tool.run_helm(helm, "template", "tether", str(CHART), "--namespace", "tether", *args)
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"}


def test_defaults_are_tls_with_a_database_key_and_a_week_long_credential(helm):
    # TLS is on by default since issue 10 (a CA made at install: tests/charts/test_chart_production.py).
    args = deployments(helm)["tether-controller"]["containers"][0]["args"]
    assert {"--tls-cert=/etc/tether/tls/tls.crt", "--tls-key=/etc/tether/tls/tls.key"} <= set(args)
    assert "--ca-file=/etc/tether/tls/ca.crt" in deployments(helm)["tether-operator"]["containers"][0]["args"]


def test_tls_off_is_plaintext_with_a_database_key_and_a_week_long_credential(helm):
    pods = deployments(helm, "--set", "controller.tls.enabled=false")
    args = pods["tether-controller"]["containers"][0]["args"]
    assert "--credential-ttl=604800" in args
    assert not any(a.startswith(("--tls", "--credential-key-file", "--require-signed")) for a in args)
    assert not any(a.startswith(("--ca-file", "--client-")) for a in pods["tether-operator"]["containers"][0]["args"])


def test_tls_mtls_keys_and_signatures(helm):
    pods = deployments(
        helm,
        "--set",
        "controller.tls.secretName=tether-tls,controller.tls.requireClientCerts=true",
        "--set",
        "operator.tls.clientSecretName=tether-operator-client",
        "--set",
        "controller.credentialKeys.secretName=tether-credential-keys,controller.credentialTTLSeconds=86400",
        "--set",
        "controller.requireSignedBundles=true",
    )
    controller = pods["tether-controller"]
    args = controller["containers"][0]["args"]
    for expected in (
        "--tls-cert=/etc/tether/tls/tls.crt",
        "--tls-key=/etc/tether/tls/tls.key",
        "--tls-client-ca=/etc/tether/tls/ca.crt",
        "--credential-key-file=/etc/tether/credential-keys/credential.keys",
        "--credential-ttl=86400",
        "--require-signed-bundles",
    ):
        assert expected in args
    volumes = {v["name"]: v for v in controller["volumes"]}
    assert volumes["credential-keys"]["secret"]["secretName"] == "tether-credential-keys"
    operator = pods["tether-operator"]
    op_args = operator["containers"][0]["args"]
    assert "--ca-file=/etc/tether/tls/ca.crt" in op_args
    assert (
        "--client-cert=/etc/tether/client/tls.crt" in op_args and "--client-key=/etc/tether/client/tls.key" in op_args
    )
    op_volumes = {v["name"]: v for v in operator["volumes"]}
    # The operator gets the CA only, never the controller's private key.
    assert op_volumes["controller-ca"]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    assert op_volumes["client-tls"]["secret"]["secretName"] == "tether-operator-client"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (
            [
                "--set",
                "controller.tls.enabled=false,controller.tls.requireClientCerts=true,operator.tls.clientSecretName=c",
            ],
            "needs controller.tls.enabled",
        ),
        (
            ["--set", "controller.tls.secretName=t,controller.tls.requireClientCerts=true"],
            "needs operator.tls.clientSecretName",
        ),
        (["--set", "controller.credentialTTLSeconds=5"], "credentialTTLSeconds"),
    ],
)
def test_inconsistent_security_values_are_refused(helm, args, words):
    result = helm_tool.run_helm(helm, "template", "tether", str(CHART), *args, check=False)
    assert result.returncode != 0 and words in result.stderr, result.stderr
