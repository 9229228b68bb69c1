"""A small Kubernetes REST client for the CLI: read and merge-patch MLTask objects.

`tether rollout pause|resume|promote|abort` and `tether status --kubeconfig`
need two calls (GET an object, PATCH it with a JSON merge patch), not a
client library. Credentials come from a kubeconfig (its current context:
server, CA, client certificate and key, or a bearer token; inline `*-data`
or file paths) or, inside a pod, from the service account.

Errors become `TetherError`s: a missing object is `NotFound`, a refused
credential `Unauthenticated` / `PermissionDenied`, an unreachable API server
`Unavailable`, so the CLI reports them in one line.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import pathlib
import ssl
import tempfile
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import yaml

from tether.common import errors

SERVICE_ACCOUNT = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount")
MLTASKS = ("tether.dev", "v1alpha1", "mltasks")


class Unavailable(errors.TetherError):
    code = "UNAVAILABLE"


@dataclasses.dataclass(frozen=True, kw_only=True)
class KubeConfig:
    server: str
    namespace: str = "default"
    token: str | None = None
    ca_data: bytes | None = None
    cert_data: bytes | None = None
    key_data: bytes | None = None
    insecure: bool = False

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> KubeConfig:
        """From `path`, else $KUBECONFIG, else ~/.kube/config, else the pod's service account."""
        candidates = [path] if path else [*os.environ.get("KUBECONFIG", "").split(os.pathsep), "~/.kube/config"]
        for candidate in candidates:
            if candidate and pathlib.Path(candidate).expanduser().is_file():
                return cls.from_kubeconfig(pathlib.Path(candidate).expanduser())
        if path:
            raise errors.InvalidArgument(f"kubeconfig {path} does not exist")
        if (SERVICE_ACCOUNT / "token").is_file() and os.environ.get("KUBERNETES_SERVICE_HOST"):
            return cls.in_cluster()
        raise errors.FailedPrecondition(
            "no kubeconfig found (--kubeconfig, $KUBECONFIG, ~/.kube/config) and not in a pod"
        )

    @classmethod
    def from_kubeconfig(cls, path: pathlib.Path) -> KubeConfig:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        name = doc.get("current-context")
        contexts = {c["name"]: c.get("context") or {} for c in doc.get("contexts") or []}
        if name not in contexts:
            raise errors.InvalidArgument(f"{path}: current-context {name!r} is not defined")
        context = contexts[name]
        cluster = {c["name"]: c.get("cluster") or {} for c in doc.get("clusters") or []}.get(context.get("cluster"), {})
        user = {u["name"]: u.get("user") or {} for u in doc.get("users") or []}.get(context.get("user"), {})
        if not cluster.get("server"):
            raise errors.InvalidArgument(f"{path}: the current context's cluster has no server")
        base = path.parent

        def blob(data_key: str, file_key: str, where: Mapping[str, Any]) -> bytes | None:
            if where.get(data_key):
                return base64.b64decode(where[data_key])
            if where.get(file_key):
                return (base / os.path.expanduser(where[file_key])).read_bytes()
            return None

        token = user.get("token")
        if not token and user.get("tokenFile"):
            token = (base / user["tokenFile"]).read_text().strip()
        return cls(
            server=cluster["server"].rstrip("/"),
            namespace=context.get("namespace") or "default",
            token=token,
            ca_data=blob("certificate-authority-data", "certificate-authority", cluster),
            cert_data=blob("client-certificate-data", "client-certificate", user),
            key_data=blob("client-key-data", "client-key", user),
            insecure=bool(cluster.get("insecure-skip-tls-verify")),
        )

    @classmethod
    def in_cluster(cls) -> KubeConfig:
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        namespace_file = SERVICE_ACCOUNT / "namespace"
        return cls(
            server=f"https://{host}:{port}",
            namespace=namespace_file.read_text().strip() if namespace_file.is_file() else "default",
            token=(SERVICE_ACCOUNT / "token").read_text().strip(),
            ca_data=(SERVICE_ACCOUNT / "ca.crt").read_bytes(),
        )

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https://"):
            return False
        if self.insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx = ssl.create_default_context(cadata=self.ca_data.decode() if self.ca_data else None)
        if self.cert_data and self.key_data:
            with tempfile.TemporaryDirectory() as d:  # ssl wants files; they live only while loading
                cert, key = pathlib.Path(d) / "cert.pem", pathlib.Path(d) / "key.pem"
                cert.write_bytes(self.cert_data)
                key.write_bytes(self.key_data)
                ctx.load_cert_chain(cert, key)
        return ctx


class KubeClient:
    """`async with KubeClient(KubeConfig.load()) as kube: await kube.patch_mltask(ns, name, patch)`."""

    def __init__(self, config: KubeConfig, *, timeout_s: float = 15.0) -> None:
        self.config = config
        self._timeout_s = timeout_s
        self._session: Any = None

    async def __aenter__(self) -> KubeClient:
        import aiohttp

        headers = {"Accept": "application/json"}
        if self.config.token:
            headers["Authorization"] = f"Bearer {self.config.token}"
        self._session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            connector=aiohttp.TCPConnector(ssl=self.config.ssl_context()),
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._session.close()

    def _url(self, namespace: str, name: str, resource: tuple[str, str, str] = MLTASKS) -> str:
        group, version, plural = resource
        return f"{self.config.server}/apis/{group}/{version}/namespaces/{namespace}/{plural}/{name}"

    async def get_mltask(self, namespace: str, name: str) -> dict[str, Any]:
        return await self._call("GET", self._url(namespace, name), what=f"mltask {namespace}/{name}")

    async def patch_mltask(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """A JSON merge patch (RFC 7386) of the object (spec and metadata; status is the operator's)."""
        return await self._call(
            "PATCH",
            self._url(namespace, name),
            what=f"mltask {namespace}/{name}",
            json_body=dict(patch),
            content_type="application/merge-patch+json",
        )

    async def _call(
        self,
        method: str,
        url: str,
        *,
        what: str,
        json_body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        import json

        import aiohttp

        try:
            async with self._session.request(
                method,
                url,
                data=None if json_body is None else json.dumps(json_body),
                headers={"Content-Type": content_type},
            ) as response:
                text = await response.text()
                if response.status == 404:
                    raise errors.NotFound(f"{what} does not exist")
                if response.status == 401:
                    raise errors.Unauthenticated(f"the API server refused the credential ({what})")
                if response.status == 403:
                    raise errors.PermissionDenied(f"not allowed to {method} {what}: {text[:200]}")
                if response.status >= 400:
                    raise errors.InvalidArgument(f"{method} {what}: HTTP {response.status}: {text[:300]}")
                return json.loads(text) if text else {}
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise Unavailable(f"the Kubernetes API at {self.config.server} is unreachable: {e}") from None
