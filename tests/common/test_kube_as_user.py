"""`kube.as_user`: the API server and CA of the loaded credentials, authenticated by a user's token alone."""

from __future__ import annotations

import pathlib

import yaml

from tether.common import kube


async def test_as_user_keeps_server_and_ca_and_drops_every_other_credential(tmp_path: pathlib.Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "c", "cluster": {"server": "https://k8s.example:6443", "certificate-authority": str(ca)}}
        ],
        "users": [{"name": "u", "user": {"token": "the-dashboards-own-token"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "ml"}}],
        "current-context": "x",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    own = await kube.load(path)
    user = kube.as_user(own, "alice-token")
    assert user.server == own.server == "https://k8s.example:6443"
    assert user.configuration.ssl_ca_cert == own.configuration.ssl_ca_cert
    assert user.authorization == "Bearer alice-token"
    assert user.configuration.refresh_api_key_hook is None and user.configuration.cert_file is None
    assert own.authorization == "Bearer the-dashboards-own-token"  # the original is untouched
    assert user.namespace == "ml"
