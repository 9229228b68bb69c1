"""The Kubernetes API for everything outside Kopf, through the official client (`kubernetes_asyncio`).

`tether rollout pause|resume|promote|abort`, `tether status --kubeconfig` and
the operator's login resolve credentials here, exactly as kubectl would: a
kubeconfig (`--kubeconfig`, else $KUBECONFIG — several files merged —, else
~/.kube/config; its current context or `context`) with any of its user kinds
— a bearer token or token file, client certificates, an `exec` credential
plugin (EKS, GKE, AKS, kubelogin), an OIDC `auth-provider`, basic auth — or,
inside a pod, the service account (its token re-read as it rotates).

Bad input never hangs and never reaches the caller as a library exception:
a malformed kubeconfig is `InvalidArgument` naming the file, an exec plugin
that fails (exit code, bad JSON) or runs past `exec_timeout_s` is
`Unauthenticated` naming the command, a missing object `NotFound`, a refused
credential `Unauthenticated` / `PermissionDenied`, an unreachable API server
`Unavailable`; the CLI prints them in one line.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import dataclasses
import datetime
import json
import os
import pathlib
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import aiohttp
import yaml
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.config import exec_provider, incluster_config, kube_config

from tether.common import errors

SERVICE_ACCOUNT = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount")
MLTASKS = ("tether.dev", "v1alpha1", "mltasks")
EXEC_TIMEOUT_S = 30.0


class Unavailable(errors.TetherError):
    code = "UNAVAILABLE"


_exec_timeout_s: contextvars.ContextVar[float] = contextvars.ContextVar("exec_timeout_s", default=EXEC_TIMEOUT_S)


class AlreadyExists(errors.TetherError):
    """A create found the object there already (HTTP 409)."""

    code = "ALREADY_EXISTS"


class BoundedExecProvider(exec_provider.ExecProvider):
    """The library's exec plugin runner (same config parsing, same ExecCredential checks) with a deadline.

    The library waits for the plugin for ever and, when its caller gives up, leaves the process running;
    this one kills it after `exec_timeout_s` (a plugin waiting for a browser login, a wedged SSO helper)
    and reports which command it was. Installed in place of the library's class when this module loads.
    """

    async def run(self, previous_response: str | None = None) -> Any:
        info: dict[str, Any] = {"apiVersion": self.api_version, "kind": "ExecCredential"}
        info["spec"] = {"interactive": False}  # no terminal prompts from a daemon or a script
        self.env["KUBERNETES_EXEC_INFO"] = json.dumps(info)
        timeout_s = _exec_timeout_s.get()
        proc = await asyncio.create_subprocess_exec(
            *self.args,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=timeout_s)
        except (TimeoutError, asyncio.CancelledError) as e:
            proc.kill()
            await proc.wait()
            if isinstance(e, asyncio.CancelledError):
                raise
            raise k8s_config.ConfigException(f"exec: gave no credential in {timeout_s:g} s (killed)") from None
        if proc.returncode != 0:
            detail = stderr.decode(errors="replace").strip()[-500:]
            raise k8s_config.ConfigException(
                f"exec: process returned {proc.returncode}" + (f". {detail}" if detail else "")
            )
        try:
            data = json.loads(stdout)
        except ValueError as e:
            raise k8s_config.ConfigException(f"exec: failed to decode process output: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("status"), dict):
            raise k8s_config.ConfigException("exec: malformed response: no ExecCredential status")
        if data.get("apiVersion") != self.api_version:
            raise k8s_config.ConfigException(
                f"exec: plugin api version {data.get('apiVersion')} does not match {self.api_version}"
            )
        return data["status"]


kube_config.ExecProvider = BoundedExecProvider  # type: ignore[misc]  # the loader looks the class up here


@dataclasses.dataclass(frozen=True, kw_only=True)
class Credentials:
    """What one login resolved: the client's configuration, the context's namespace, when the token expires."""

    configuration: k8s.Configuration
    namespace: str = "default"
    source: str = ""  # the kubeconfig file(s) or "in-cluster", for messages
    expires: datetime.datetime | None = None

    @property
    def server(self) -> str:
        return str(self.configuration.host)

    @property
    def authorization(self) -> str | None:
        """The `Authorization` header value (`Bearer ...`, `Basic ...`) or None (client certificates only)."""
        value = self.configuration.api_key.get("BearerToken")
        return str(value) if value else None


def as_user(credentials: Credentials, token: str) -> Credentials:
    """The same API server and CA, authenticated as the holder of bearer `token` and nothing else.

    The dashboard's "cluster credentials" login: a user's own token, so the API server's RBAC
    decides what that user may do. The original user's token, client certificate, basic auth and
    refresh hook (exec plugin, rotating service-account token) are all dropped from the copy.
    """
    configuration = copy.deepcopy(credentials.configuration)
    configuration.api_key = {"BearerToken": f"Bearer {token}"}
    configuration.api_key_prefix = {}
    configuration.refresh_api_key_hook = None
    configuration.cert_file = None
    configuration.key_file = None
    configuration.username = None
    configuration.password = None
    return Credentials(configuration=configuration, namespace=credentials.namespace, source="a user's bearer token")


def _candidates(path: str | os.PathLike[str] | None) -> list[pathlib.Path]:
    if path:
        return [pathlib.Path(path).expanduser()]
    listed = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    return [pathlib.Path(p).expanduser() for p in [*listed, "~/.kube/config"]]


async def load(
    kubeconfig: str | os.PathLike[str] | None = None,
    *,
    context: str | None = None,
    exec_timeout_s: float = EXEC_TIMEOUT_S,
) -> Credentials:
    """From `kubeconfig`, else $KUBECONFIG, else ~/.kube/config, else the pod's service account."""
    files = [p for p in _candidates(kubeconfig) if p.is_file()]
    if kubeconfig and not files:
        raise errors.InvalidArgument(f"kubeconfig {kubeconfig} does not exist")
    if files:
        return await _from_kubeconfig(files, context=context, exec_timeout_s=exec_timeout_s)
    if (SERVICE_ACCOUNT / "token").is_file() and os.environ.get("KUBERNETES_SERVICE_HOST"):
        return in_cluster()
    raise errors.FailedPrecondition("no kubeconfig found (--kubeconfig, $KUBECONFIG, ~/.kube/config) and not in a pod")


async def _from_kubeconfig(files: list[pathlib.Path], *, context: str | None, exec_timeout_s: float) -> Credentials:
    source = os.pathsep.join(str(f) for f in files)
    merged: dict[str, Any] = {"clusters": [], "contexts": [], "users": []}
    for f in files:  # the library reports a bad file as a bare exception or assert: name the problem first
        try:
            doc = yaml.safe_load(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise errors.InvalidArgument(f"kubeconfig {f} is not readable YAML: {e}") from None
        if not isinstance(doc, dict):
            raise errors.InvalidArgument(f"kubeconfig {f} is not a mapping")
        for kind in ("clusters", "contexts", "users"):  # merged as kubectl does: the first of a name wins
            items = doc.get(kind) or []
            if not isinstance(items, list) or not all(isinstance(i, dict) and "name" in i for i in items):
                raise errors.InvalidArgument(f"kubeconfig {f}: {kind} must be a list of named entries")
            merged[kind] += [i for i in items if _named(merged, kind, i["name"]) is None]
        if "current-context" in doc:
            merged["current-context"] = doc["current-context"]
    _check(merged, context=context, source=source)
    configuration = k8s.Configuration()
    try:
        loader = kube_config.KubeConfigLoader(
            config_dict=kube_config.KubeConfigMerger(source).config,
            config_base_path=None,
            active_context=context,
        )
        user = loader._user  # the library keeps the chosen user private; read only to name an exec command
        command = str(user["exec"]["command"]) if user is not None and "exec" in user else None
        token = _exec_timeout_s.set(exec_timeout_s)
        try:  # the plugin has its own deadline; this one bounds an OIDC refresh or a plugin's own children
            await asyncio.wait_for(loader.load_and_set(configuration), timeout=exec_timeout_s + 5)
        finally:
            _exec_timeout_s.reset(token)
    except TimeoutError:
        raise errors.Unauthenticated(f"kubeconfig {source}: no credential in {exec_timeout_s + 5:g} s") from None
    except k8s_config.ConfigException as e:
        if str(e).startswith("exec:"):
            raise errors.Unauthenticated(f"kubeconfig {source}: credential plugin {command!r} failed: {e}") from None
        raise errors.InvalidArgument(f"kubeconfig {source}: {e}") from None
    except (KeyError, TypeError, ValueError, AssertionError, AttributeError) as e:
        what = str(e) or "the current context, its cluster or its user is missing or malformed"
        raise errors.InvalidArgument(f"kubeconfig {source} is malformed: {what}") from None
    except OSError as e:  # a certificate or token file it names, or an exec command that does not exist
        raise errors.InvalidArgument(f"kubeconfig {source}: {e}") from None
    current = loader.current_context or {}
    expiry = getattr(loader, "exec_plugin_expiry", None)
    return Credentials(
        configuration=configuration,
        namespace=(current.get("context") or {}).get("namespace") or "default",
        source=source,
        expires=expiry if isinstance(expiry, datetime.datetime) else None,
    )


def _named(doc: Mapping[str, Any], kind: str, name: Any) -> Mapping[str, Any] | None:
    for item in doc.get(kind) or []:
        if isinstance(item, Mapping) and item.get("name") == name:
            return item
    return None


def _check(doc: Mapping[str, Any], *, context: str | None, source: str) -> None:
    """Name what is missing before the library trips over it with a bare KeyError or assert."""
    name = context or doc.get("current-context")
    if not name:
        raise errors.InvalidArgument(f"kubeconfig {source}: no current-context (and no --context)")
    entry = _named(doc, "contexts", name)
    if entry is None or not isinstance(entry.get("context"), Mapping):
        raise errors.InvalidArgument(f"kubeconfig {source}: context {name!r} is not defined")
    cluster_name = entry["context"].get("cluster")
    cluster = _named(doc, "clusters", cluster_name)
    if cluster is None or not isinstance(cluster.get("cluster"), Mapping):
        raise errors.InvalidArgument(
            f"kubeconfig {source}: context {name!r} names cluster {cluster_name!r}, not defined"
        )
    if not cluster["cluster"].get("server"):
        raise errors.InvalidArgument(f"kubeconfig {source}: cluster {cluster_name!r} has no server")
    user_name = entry["context"].get("user")
    if user_name is not None and _named(doc, "users", user_name) is None:
        raise errors.InvalidArgument(f"kubeconfig {source}: context {name!r} names user {user_name!r}, not defined")


def in_cluster(*, account: pathlib.Path = SERVICE_ACCOUNT) -> Credentials:
    """The pod's service account; the client re-reads the token as the kubelet rotates it."""
    configuration = k8s.Configuration()
    try:
        incluster_config.load_incluster_config(
            client_configuration=configuration,
            token_filename=str(account / "token"),
            cert_filename=str(account / "ca.crt"),
        )
    except k8s_config.ConfigException as e:
        raise errors.FailedPrecondition(f"in-cluster credentials: {e}") from None
    namespace_file = account / "namespace"
    namespace = namespace_file.read_text().strip() if namespace_file.is_file() else "default"
    return Credentials(configuration=configuration, namespace=namespace, source="in-cluster")


class KubeClient:
    """`async with KubeClient(await kube.load()) as kube: await kube.patch_mltask(ns, name, patch)`."""

    def __init__(self, credentials: Credentials, *, timeout_s: float = 15.0) -> None:
        self.credentials = credentials
        self._timeout_s = timeout_s
        self._api: k8s.ApiClient | None = None

    async def __aenter__(self) -> KubeClient:
        self._api = k8s.ApiClient(configuration=self.credentials.configuration)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._api is not None:
            await self._api.close()

    def _objects(self) -> k8s.CustomObjectsApi:
        if self._api is None:
            raise RuntimeError("KubeClient is used outside `async with`")
        return k8s.CustomObjectsApi(self._api)

    async def get_mltask(self, namespace: str, name: str) -> dict[str, Any]:
        group, version, plural = MLTASKS
        return await self._call(
            "GET",
            f"mltask {namespace}/{name}",
            self._objects().get_namespaced_custom_object(
                group, version, namespace, plural, name, _request_timeout=self._timeout_s
            ),
        )

    async def list_mltasks(self, namespace: str | None) -> list[dict[str, Any]]:
        """Every MLTask of `namespace` (None: of every namespace the credentials may list)."""
        group, version, plural = MLTASKS
        objects = self._objects()
        if namespace is None:
            call = objects.list_cluster_custom_object(group, version, plural, _request_timeout=self._timeout_s)
        else:
            call = objects.list_namespaced_custom_object(
                group, version, namespace, plural, _request_timeout=self._timeout_s
            )
        result = await self._call("LIST", f"mltasks in {namespace or 'every namespace'}", call)
        return [dict(item) for item in result.get("items") or []]

    async def list_events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """The events about MLTask `namespace/name`, oldest first (filtered here too: not every API filters)."""
        if self._api is None:
            raise RuntimeError("KubeClient is used outside `async with`")
        core = k8s.CoreV1Api(self._api)
        result = await self._call(
            "LIST",
            f"events of mltask {namespace}/{name}",
            core.list_namespaced_event(
                namespace,
                field_selector=f"involvedObject.name={name}",
                _request_timeout=self._timeout_s,
                _preload_content=False,
            ),
            raw=True,
        )
        items = [
            e
            for e in result.get("items") or []
            if (e.get("involvedObject") or {}).get("name") == name
            and (e.get("involvedObject") or {}).get("kind", "MLTask") == "MLTask"
        ]
        return sorted(items, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))

    async def patch_mltask(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """A JSON merge patch (RFC 7386) of the object (spec and metadata; status is the operator's)."""
        group, version, plural = MLTASKS
        return await self._call(
            "PATCH",
            f"mltask {namespace}/{name}",
            self._objects().patch_namespaced_custom_object(
                group,
                version,
                namespace,
                plural,
                name,
                dict(patch),
                _content_type="application/merge-patch+json",  # type: ignore[call-arg]
                _request_timeout=self._timeout_s,
            ),
        )

    async def apply_mltask(self, obj: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """Create the MLTask, or make the existing one's spec exactly `obj`'s: ("created"|"configured"|"unchanged", it).

        Like `kubectl apply` of a whole file: the spec is replaced (fields no longer given are
        removed), labels and annotations given are set, others kept; status stays the operator's.
        """
        group, version, plural = MLTASKS
        meta = obj.get("metadata") or {}
        namespace, name = str(meta["namespace"]), str(meta["name"])
        try:
            created = await self._call(
                "POST",
                f"mltask {namespace}/{name}",
                self._objects().create_namespaced_custom_object(
                    group, version, namespace, plural, dict(obj), _request_timeout=self._timeout_s
                ),
            )
            return "created", created
        except AlreadyExists:
            pass
        live = await self.get_mltask(namespace, name)
        patch = replacing_patch(live, obj)
        if not patch:
            return "unchanged", live
        return "configured", await self.patch_mltask(namespace, name, patch)

    async def _call(self, method: str, what: str, call: Any, *, raw: bool = False) -> dict[str, Any]:
        try:
            result = await call
            if raw:  # an unparsed response: its JSON body as plain dicts (camelCase, as the API sends it)
                async with result:
                    result = json.loads(await result.read())
        except k8s.ApiException as e:
            body = str(e.body or e.reason or "")[:300]
            if e.status == 404:
                raise errors.NotFound(f"{what} does not exist") from None
            if e.status == 409 and method == "POST":
                raise AlreadyExists(f"{what} exists") from None
            if e.status == 401:
                raise errors.Unauthenticated(f"the API server refused the credential ({what})") from None
            if e.status == 403:
                raise errors.PermissionDenied(f"not allowed to {method} {what}: {body}") from None
            raise errors.InvalidArgument(f"{method} {what}: HTTP {e.status}: {body}") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise Unavailable(
                f"the Kubernetes API at {self.credentials.server} is unreachable: {e or type(e).__name__}"
            ) from None
        return dict(result or {})


def replacing_patch(live: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) making `live`'s spec `wanted`'s and adding its labels/annotations.

    Pure. Empty when nothing would change.
    """
    patch: dict[str, Any] = {}
    spec = _merge_diff(live.get("spec") or {}, wanted.get("spec") or {})
    if spec:
        patch["spec"] = spec
    meta: dict[str, Any] = {}
    for key in ("labels", "annotations"):
        given = (wanted.get("metadata") or {}).get(key) or {}
        have = (live.get("metadata") or {}).get(key) or {}
        changed = {k: v for k, v in given.items() if have.get(k) != v}
        if changed:
            meta[key] = changed
    if meta:
        patch["metadata"] = meta
    return patch


def _merge_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            sub = _merge_diff(before, value)
            if sub:
                out[key] = sub
        elif before != value or key not in old:
            out[key] = value
    return out
