"""Smoke-test a built Tether image: start its components with `buildah run --isolation chroot` and show they serve.

Run by images/build-and-smoke.sh after the build. On the host: PostgreSQL and Redis on loopback (embedded ones
from tether.devtools, or the servers TETHER_DATABASE_URL / TETHER_BROKER_URL name) and the Kubernetes API
emulator. From the image (host network, as the image's own non-root user): the controller, a Celery worker and the
operator. Checks, each with a deadline:

- controller: the standard gRPC health check (grpc.health.v1.Health/Check) answers SERVING;
- worker: a Celery `ping` broadcast over the broker gets its answer;
- operator: it logs in to the API (the emulator's kubeconfig) and handles an MLTask: Kopf's finalizer or status
  appears on it (its bundle does not exist, so the controller refuses the release: the status says so);
- agent image: `tether agent --help` runs, and no cloud package is importable.

Everything started is stopped (SIGTERM, then SIGKILL) and its buildah container removed, on failure too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tether.devtools.emulator import EmulatedCluster

ADMIN_TOKEN = "smoke-admin-token"
BOOTSTRAP_TOKEN = "smoke-bootstrap-token"
HOME = "/var/lib/tether"  # the image's WORKDIR and HOME, owned by its user
CLOUD_PACKAGES = ("kopf", "celery", "psycopg", "kubernetes_asyncio")  # never in the agent image
LEAK_CHECK = f"import importlib.util as u; print(' '.join(m for m in {CLOUD_PACKAGES!r} if u.find_spec(m)))"


class SmokeError(RuntimeError):
    """A check failed; the message names it."""


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], *, timeout: float = 120) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise SmokeError(f"{' '.join(cmd)!r} did not finish within {timeout:.0f}s") from None
    if done.returncode != 0:
        raise SmokeError(f"{' '.join(cmd)!r} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout.strip()


class Containers:
    """buildah working containers from the image and the processes run in them; all removed on close."""

    def __init__(self, *, image: str, log_dir: pathlib.Path) -> None:
        self.image = image
        self.log_dir = log_dir
        self.containers: list[str] = []
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def new(self, name: str, *, image: str | None = None) -> str:
        ctr = run(
            [
                "buildah",
                "from",
                "--quiet",
                "--pull-never",
                "--name",
                f"tether-smoke-{name}-{os.getpid()}",
                image or self.image,
            ]
        )
        self.containers.append(ctr)
        return ctr

    def copy(self, ctr: str, src: pathlib.Path, dest: str) -> None:
        run(["buildah", "copy", "--chown", "10001:10001", ctr, str(src), dest])

    def exec(self, ctr: str, *argv: str, timeout: float = 120) -> str:
        return run(["buildah", "run", "--isolation", "chroot", "--network", "host", ctr, "--", *argv], timeout=timeout)

    def start(self, name: str, ctr: str, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        cmd = ["buildah", "run", "--isolation", "chroot", "--network", "host"]
        for key, value in (env or {}).items():
            cmd += ["--env", f"{key}={value}"]
        cmd += [ctr, "--", *argv]
        log = (self.log_dir / f"{name}.log").open("wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        say(f"started {name} from the image (pid {proc.pid}): {' '.join(argv)}")
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise SmokeError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def close(self, *, grace: float = 30) -> None:
        """SIGTERM to every component at once (their graceful shutdown), SIGKILL to what outlives `grace`."""
        t0 = time.monotonic()
        running = [(name, proc) for name, proc in self.procs if proc.poll() is None]
        for _, proc in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # the process group this script started
        for name, proc in running:
            try:
                proc.wait(timeout=max(0.1, grace - (time.monotonic() - t0)))
                say(f"{name} stopped in {time.monotonic() - t0:.1f}s")
            except subprocess.TimeoutExpired:
                say(f"{name} still running {grace:.0f}s after SIGTERM: killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for ctr in reversed(self.containers):
            try:
                run(["buildah", "rm", ctr], timeout=60)
            except SmokeError as e:
                say(f"warning: {e}")
        self.containers = []


async def until(what: str, check: Callable[[], object], *, timeout: float, alive: Callable[[], None]) -> object:
    """Poll `check` (sync or async) until it returns a truthy value; SmokeError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        alive()
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
        except Exception as e:  # not up yet: keep the last reason for the error message
            last = e
        await asyncio.sleep(0.5)
    raise SmokeError(f"{what}: no answer within {timeout:.0f}s (last: {last!r})")


@contextlib.contextmanager
def servers() -> Iterator[tuple[str, str]]:
    from tether.devtools import embedded

    with embedded.postgres_url() as database_url, embedded.broker_url() as broker_url:
        yield database_url, broker_url


async def health_serving(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def celery_ping(broker_url: str) -> list[dict[str, object]]:
    import celery

    app = celery.Celery("tether-smoke", broker=broker_url)
    try:
        replies: list[dict[str, object]] = app.control.ping(timeout=2.0) or []
    finally:
        app.close()
    return replies


@contextlib.asynccontextmanager
async def cluster(workdir: pathlib.Path) -> AsyncIterator[EmulatedCluster]:
    from tether.devtools import emulator

    async with emulator.emulated_cluster(workdir=workdir) as c:
        yield c


async def smoke(args: argparse.Namespace) -> None:
    from tether.devtools import embedded

    log_dir = pathlib.Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    box = Containers(image=args.image, log_dir=log_dir)
    try:
        if args.agent_image:
            agent = box.new("agent", image=args.agent_image)
            box.exec(agent, "tether", "agent", "--help")
            leaked = box.exec(
                agent,
                "python3",
                "-c",
                LEAK_CHECK,
            )
            if leaked:
                raise SmokeError(f"the agent image carries cloud packages: {leaked}")
            user = box.exec(agent, "id", "-u")
            if user == "0":
                raise SmokeError("the agent image runs as root")
            say(f"agent image: `tether agent --help` runs as uid {user}; no cloud packages")

        with servers() as (database_url, broker_url):
            say(f"PostgreSQL {database_url.split('@')[-1]}, Redis {broker_url.split('@')[-1]} on the host")
            async with cluster(log_dir) as c:
                try:
                    port = embedded.free_port()
                    address = f"127.0.0.1:{port}"
                    controller = box.new("controller")
                    uid = box.exec(controller, "id", "-u")
                    if uid == "0":
                        raise SmokeError("the cloud image runs as root")
                    box.start(
                        "controller",
                        controller,
                        "tether",
                        "--log-level",
                        "INFO",
                        "controller",
                        "--listen",
                        address,
                        "--blob-dir",
                        f"{HOME}/blobs",
                        env={
                            "TETHER_DATABASE_URL": database_url,
                            "TETHER_BROKER_URL": broker_url,
                            "TETHER_ADMIN_TOKEN": ADMIN_TOKEN,
                            "TETHER_BOOTSTRAP_TOKEN": BOOTSTRAP_TOKEN,
                        },
                    )
                    worker = box.new("worker")
                    box.start(
                        "worker",
                        worker,
                        "tether",
                        "--log-level",
                        "INFO",
                        "worker",
                        "--broker-url",
                        broker_url,
                        "--database-url",
                        database_url,
                    )
                    await until(
                        f"controller gRPC health check on {address}",
                        lambda: health_serving(address),
                        timeout=args.timeout,
                        alive=box.check_alive,
                    )
                    say(f"controller (uid {uid}): grpc.health.v1.Health/Check on {address} answers SERVING")
                    replies = await until(
                        "Celery ping of the worker",
                        lambda: asyncio.to_thread(celery_ping, broker_url),
                        timeout=args.timeout,
                        alive=box.check_alive,
                    )
                    say(f"worker: Celery ping answered {replies}")

                    operator = box.new("operator")
                    box.copy(operator, c.kubeconfig_path, f"{HOME}/kubeconfig.yaml")
                    box.start(
                        "operator",
                        operator,
                        "tether",
                        "--log-level",
                        "INFO",
                        "operator",
                        "--controller",
                        address,
                        "--kubeconfig",
                        f"{HOME}/kubeconfig.yaml",
                        "--namespace",
                        c.namespace,
                        env={"TETHER_ADMIN_TOKEN": ADMIN_TOKEN},
                    )
                    await c.create(
                        {
                            "apiVersion": "tether.dev/v1alpha1",
                            "kind": "MLTask",
                            "metadata": {"name": "smoke"},
                            "spec": {
                                "bundle": {"digest": "sha256:" + "0" * 64},
                                "trigger": {"type": "onInstall"},
                                "target": {"matchLabels": {"app": "smoke"}},
                            },
                        }
                    )

                    async def handled() -> object:
                        obj = await c.get(c.namespace, "smoke")
                        if obj is None:
                            return None
                        meta = obj.get("metadata", {})
                        return obj.get("status") or meta.get("finalizers")

                    seen = await until(
                        "the operator handling an MLTask", handled, timeout=args.timeout, alive=box.check_alive
                    )
                    say(f"operator: logged in to the API at {c.url} and handled MLTask default/smoke: {seen}")
                finally:
                    # The components first, while the API, PostgreSQL and Redis are still there to say goodbye to
                    # (an emulator with open watches, or a database with open sessions, is slow to stop).
                    box.close()
                    say("stopped the components and removed their containers")
    except SmokeError:
        for name, _ in box.procs:
            say(f"--- last lines of {name}:\n{box.tail(name)}")
        raise
    finally:
        box.close()  # on failure; a no-op after a pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True, help="the cloud image (controller, worker, operator)")
    parser.add_argument("--agent-image", default="", help="the agent image (optional)")
    parser.add_argument("--log-dir", required=True, help="each component's output goes to LOG_DIR/NAME.log")
    parser.add_argument("--timeout", type=float, default=90, help="seconds each check may take")
    args = parser.parse_args()
    try:
        asyncio.run(smoke(args))
    except SmokeError as e:
        print(f"smoke test FAILED: {e}", file=sys.stderr)
        return 1
    say("smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
