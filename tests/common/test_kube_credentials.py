"""The official Kubernetes client behind `tether rollout`, `tether status` and the operator's login.

A loopback API server records what reaches it: the token an `exec` credential plugin prints, an OIDC
id-token, a service account's token, a client certificate. Bad kubeconfigs and failing or hanging
plugins give one clear error, quickly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import pathlib
import ssl
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml
from aiohttp import web

from tether.cli import rollout as rollout_cli
from tether.common import certs, errors, kube
from tether.operator import handlers

TASK_PATH = "/apis/tether.dev/v1alpha1/namespaces/{ns}/mltasks/{name}"


class Recorder:
    """A loopback stand-in for the API server: answers one MLTask, records every request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        subject = dict(x[0] for x in peer["subject"]) if peer else {}
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "authorization": request.headers.get("Authorization"),
                "content_type": request.headers.get("Content-Type"),
                "body": await request.text(),
                "client_cn": subject.get("commonName"),
            }
        )
        obj = {"apiVersion": "tether.dev/v1alpha1", "kind": "MLTask", "metadata": dict(request.match_info)}
        return web.json_response(obj)


@contextlib.asynccontextmanager
async def api_server(*, tls: ssl.SSLContext | None = None) -> AsyncIterator[Recorder]:
    recorder = Recorder()
    app = web.Application()
    app.router.add_route("*", TASK_PATH.format(ns="{namespace}", name="{name}"), recorder.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    recorder.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        yield recorder
    finally:
        await runner.cleanup()


def write_kubeconfig(path: pathlib.Path, *, server: str, user: dict[str, Any], **cluster: Any) -> pathlib.Path:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server, **cluster}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}}],
        "current-context": "ctx",
    }
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def plugin(tmp_path: pathlib.Path, body: str) -> dict[str, Any]:
    """An `exec` user running a small Python script."""
    script = tmp_path / "credential-plugin.py"
    script.write_text(body, encoding="utf-8")
    return {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": sys.executable,
            "args": [str(script)],
            "env": [{"name": "PLUGIN_TOKEN", "value": "exec-token-42"}],
            "interactiveMode": "Never",
        }
    }


PRINT_CREDENTIAL = """
import json, os
info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
print(json.dumps({"apiVersion": info["apiVersion"], "kind": "ExecCredential",
                  "status": {"token": os.environ["PLUGIN_TOKEN"], "expirationTimestamp": "2099-01-01T00:00:00Z"}}))
"""


async def test_exec_plugin_token_reaches_the_api_server(tmp_path: pathlib.Path) -> None:
    async with api_server() as api:
        config = write_kubeconfig(tmp_path / "kubeconfig", server=api.url, user=plugin(tmp_path, PRINT_CREDENTIAL))
        message = await rollout_cli.request("pause", "task", namespace=None, kubeconfig=str(config))
    assert message == "mltask team-a/task: paused"  # the context's namespace
    (patch,) = api.requests
    assert patch["authorization"] == "Bearer exec-token-42"
    assert patch["method"] == "PATCH"
    assert patch["content_type"] == "application/merge-patch+json"
    assert json.loads(patch["body"]) == {"spec": {"paused": True}}


async def test_operator_login_runs_the_exec_plugin(tmp_path: pathlib.Path) -> None:
    config = write_kubeconfig(
        tmp_path / "kubeconfig", server="http://127.0.0.1:1", user=plugin(tmp_path, PRINT_CREDENTIAL)
    )
    info = await handlers.login_with(config)
    assert (info.scheme, info.token) == ("Bearer", "exec-token-42")
    assert info.default_namespace == "team-a"
    assert info.expiration is not None and info.expiration.year == 2099  # Kopf logs in again before then


async def test_oidc_auth_provider_token_reaches_the_api_server(tmp_path: pathlib.Path) -> None:
    def part(doc: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    id_token = f"{part({'alg': 'none'})}.{part({'sub': 'alice', 'exp': int(time.time()) + 3600})}.sig"
    user = {"auth-provider": {"name": "oidc", "config": {"id-token": id_token, "client-id": "tether"}}}
    async with api_server() as api:
        config = write_kubeconfig(tmp_path / "kubeconfig", server=api.url, user=user)
        credentials = await kube.load(config)
        async with kube.KubeClient(credentials) as client:
            await client.get_mltask("ns", "t")
    assert api.requests[0]["authorization"] == f"Bearer {id_token}"


async def test_client_certificate_over_tls(tmp_path: pathlib.Path) -> None:
    files = certs.init_ca_dir(tmp_path / "pki", hosts=["127.0.0.1", "localhost"])
    cert, key = certs.issue_client(tmp_path / "pki", "alice")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=files.ca_cert)
    tls.load_cert_chain(files.server_cert, files.server_key)
    tls.verify_mode = ssl.CERT_REQUIRED
    user = {
        "client-certificate-data": base64.b64encode(cert.read_bytes()).decode(),
        "client-key": str(key),
    }
    async with api_server(tls=tls) as api:
        config = write_kubeconfig(
            tmp_path / "kubeconfig",
            server=api.url,
            user=user,
            **{"certificate-authority": str(files.ca_cert)},
        )
        async with kube.KubeClient(await kube.load(config)) as client:
            obj = await client.get_mltask("ns", "t")
    assert obj["metadata"] == {"namespace": "ns", "name": "t"}
    assert api.requests[0]["client_cn"] == "alice"
    assert api.requests[0]["authorization"] is None


async def test_in_cluster_service_account(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = certs.init_ca_dir(tmp_path / "pki", hosts=["127.0.0.1"])
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(files.server_cert, files.server_key)
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("sa-token")
    (account / "ca.crt").write_bytes(files.ca_cert.read_bytes())
    (account / "namespace").write_text("tether-system")
    async with api_server(tls=tls) as api:
        host, port = api.url.removeprefix("https://").split(":")
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
        credentials = kube.in_cluster(account=account)
        assert credentials.namespace == "tether-system"
        async with kube.KubeClient(credentials) as client:
            await client.get_mltask("tether-system", "t")
    assert api.requests[0]["authorization"] == "Bearer sa-token"


async def test_context_other_than_the_current_one(tmp_path: pathlib.Path) -> None:
    doc = {
        "clusters": [
            {"name": "a", "cluster": {"server": "http://a.invalid"}},
            {"name": "b", "cluster": {"server": "http://b.invalid"}},
        ],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [
            {"name": "one", "context": {"cluster": "a", "user": "u"}},
            {"name": "two", "context": {"cluster": "b", "user": "u", "namespace": "n2"}},
        ],
        "current-context": "one",
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(doc))
    credentials = await kube.load(tmp_path / "kubeconfig", context="two")
    assert (credentials.server, credentials.namespace) == ("http://b.invalid", "n2")
    assert credentials.authorization == "Bearer t"


# ------------------------------------------------------------------ bad input


async def test_failing_exec_plugin_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    failing = "import sys\nsys.stderr.write('sso session expired, run aws sso login')\nsys.exit(3)\n"
    config = write_kubeconfig(tmp_path / "kubeconfig", server="http://127.0.0.1:1", user=plugin(tmp_path, failing))
    with pytest.raises(errors.Unauthenticated, match=r"credential plugin .*returned 3.*sso session expired"):
        await kube.load(config)


async def test_exec_plugin_printing_garbage_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    config = write_kubeconfig(
        tmp_path / "kubeconfig", server="http://127.0.0.1:1", user=plugin(tmp_path, "print('hi')")
    )
    with pytest.raises(errors.Unauthenticated, match="failed to decode"):
        await kube.load(config)


async def test_hanging_exec_plugin_times_out(tmp_path: pathlib.Path) -> None:
    hanging = "import time\nwhile True:\n    time.sleep(1)\n"
    config = write_kubeconfig(tmp_path / "kubeconfig", server="http://127.0.0.1:1", user=plugin(tmp_path, hanging))
    started = time.monotonic()
    with pytest.raises(errors.Unauthenticated, match=r"credential plugin .* gave no credential in 0.5 s"):
        await kube.load(config, exec_timeout_s=0.5)
    assert time.monotonic() - started < 10


async def test_operator_login_error_names_the_problem(tmp_path: pathlib.Path) -> None:
    import kopf

    (tmp_path / "kubeconfig").write_text("clusters: [")
    with pytest.raises(kopf.LoginError, match="not readable YAML"):
        await handlers.login_with(tmp_path / "kubeconfig")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("clusters: [", "not readable YAML"),
        ("- a\n- b\n", "not a mapping"),
        ("current-context: nowhere\ncontexts: []\nclusters: []\n", "context .nowhere. is not defined"),
        (
            "current-context: x\ncontexts: [{name: x, context: {cluster: missing, user: u}}]\nclusters: []\n",
            "cluster .missing., not defined",
        ),
        (
            "current-context: x\ncontexts: [{name: x, context: {cluster: c}}]\nclusters: [{name: c, cluster: {}}]\n",
            "no server",
        ),
    ],
)
async def test_malformed_kubeconfig(tmp_path: pathlib.Path, text: str, match: str) -> None:
    (tmp_path / "kubeconfig").write_text(text)
    with pytest.raises(errors.InvalidArgument, match=match):
        await kube.load(tmp_path / "kubeconfig")


async def test_missing_kubeconfig_and_unreachable_server(tmp_path: pathlib.Path) -> None:
    with pytest.raises(errors.InvalidArgument, match="does not exist"):
        await kube.load(tmp_path / "nope")
    config = write_kubeconfig(tmp_path / "kubeconfig", server="http://127.0.0.1:1", user={"token": "t"})
    with pytest.raises(kube.Unavailable, match="unreachable"):
        async with kube.KubeClient(await kube.load(config), timeout_s=5) as client:
            await client.get_mltask("ns", "t")


async def test_kubeconfig_env_lists_several_files(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a").write_text(
        yaml.safe_dump({"clusters": [{"name": "c", "cluster": {"server": "http://c.invalid"}}]})
    )
    (tmp_path / "b").write_text(
        yaml.safe_dump(
            {
                "users": [{"name": "u", "user": {"token": "merged"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]))
    credentials = await kube.load()
    assert (credentials.server, credentials.authorization) == ("http://c.invalid", "Bearer merged")


def test_no_hang_leaves_no_plugin_running(tmp_path: pathlib.Path) -> None:
    """A timed-out plugin does not outlive the command that started it."""
    marker = tmp_path / "pid"
    hanging = f"import os, time\nopen({str(marker)!r}, 'w').write(str(os.getpid()))\nwhile True:\n    time.sleep(1)\n"
    config = write_kubeconfig(tmp_path / "kubeconfig", server="http://127.0.0.1:1", user=plugin(tmp_path, hanging))
    with pytest.raises(errors.Unauthenticated):
        asyncio.run(kube.load(config, exec_timeout_s=1.0))
    pid = int(marker.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    pytest.fail(f"credential plugin {pid} still runs")
