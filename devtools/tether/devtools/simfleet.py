"""A simulated fleet to measure against: a local stack (PostgreSQL, broker, one controller) and simulator processes.

`tether bench fleet` (`bench_fleet.FleetBench`) drives it phase by phase; this
owns the plumbing: starting and stopping the stack and the worker processes
(each holding its share of the agents as `simagent.SimAgent`s), asking them
for status and timelines, reading the controller's own counters
(`StatsService.GetServerStats`), and publishing bundles through the admin API.
With `blobs="http"` the stack adds an nginx origin serving the controller's
blob directory, the controller hands out signed URLs to it, and the simulated
agents fetch by URL (`origin_served` reads what nginx sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)


class SimulatedFleet:
    def __init__(
        self,
        *,
        processes: int,
        share: int,
        poll_s: float,
        workdir: pathlib.Path,
        database_url: str | None,
        broker_url: str | None,
        tls: bool = False,
        pull_rate: float | None = None,
        controller_args: tuple[str, ...] = (),
        blobs: str = "grpc",
    ) -> None:
        self.controller_args = controller_args
        self.blobs = blobs
        self.processes = max(1, processes)
        self.share = max(1, share)
        self.poll_s = poll_s
        self.workdir = workdir
        self.database_url = database_url
        self.broker_url = broker_url
        self.tls = tls
        self.pull_rate = pull_rate
        self.root_pem: bytes | None = None
        self.stack: Any = None
        self.admin: Any = None
        self.workers: list[tuple[Any, Any]] = []

    async def start(self) -> None:
        from tether.common import admin_client, rlimits
        from tether.devtools import simagent, stack

        rlimits.raise_open_files_limit()
        self.stack = stack.LocalStack(
            stack.StackConfig(
                agents=0,
                database_url=self.database_url,
                broker_url=self.broker_url,
                workdir=self.workdir / "stack",
                keep_workdir=True,
                tls=self.tls,
                sign=False,  # agents here do not run bundles; signatures are the real agent's concern
                controller_args=(
                    *(("--pull-rate", str(self.pull_rate)) if self.pull_rate is not None else ()),
                    *self.controller_args,
                ),
                blobs=self.blobs,
                origin_connections=65536,  # every simulated agent may hold a connection to it
            )
        )
        await self.stack.start_services()
        await self.stack.start_controller()
        self.admin = admin_client.AdminClient(
            self.stack.controller_address,
            token=self.stack.admin_token,
            timeout_s=120,
            tls=self.stack.client_tls() if self.tls else None,
        )
        self.root_pem = self.stack.ca_file.read_bytes() if self.tls else None
        ctx = multiprocessing.get_context("spawn")
        for _ in range(self.processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=simagent.run_worker, args=(child,), daemon=True)
            proc.start()
            self.workers.append((proc, parent))

    async def stop(self) -> None:
        for proc, conn in self.workers:
            with contextlib.suppress(Exception):
                await self.ask(conn, {"cmd": "exit"}, timeout=30)
            proc.join(5)
            if proc.is_alive():
                proc.kill()
        with contextlib.suppress(Exception):
            await self.admin.close()
        if self.stack is not None:
            await self.stack.stop()

    async def ask(self, conn: Any, msg: Mapping[str, Any], *, timeout: float = 300) -> Any:
        def exchange() -> Any:
            conn.send(dict(msg))
            if not conn.poll(timeout):
                raise TimeoutError(f"worker did not answer {msg.get('cmd')!r} within {timeout}s")
            return conn.recv()

        reply = await asyncio.to_thread(exchange)
        if isinstance(reply, dict) and "error" in reply:
            raise RuntimeError(f"worker: {reply['error']}")
        return reply

    async def all(self, msg: Mapping[str, Any], **kw: Any) -> list[Any]:
        return list(await asyncio.gather(*(self.ask(conn, msg, **kw) for _, conn in self.workers)))

    def origin_served(self) -> tuple[int, int]:
        """(requests, body bytes) the blob origin has served so far; (0, 0) without one."""
        origin = self.stack.origin if self.stack is not None else None
        return origin.served() if origin is not None else (0, 0)

    async def stats(self) -> Any:
        import grpc

        from tether.common import auth
        from tether.proto.v1 import tether_pb2 as pb
        from tether.proto.v1 import tether_pb2_grpc as pb_grpc

        if self.root_pem is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=self.root_pem)
            channel = grpc.aio.secure_channel(self.stack.controller_address, creds)
        else:
            channel = grpc.aio.insecure_channel(self.stack.controller_address)
        async with channel as ch:
            return await pb_grpc.StatsServiceStub(ch).GetServerStats(
                pb.GetServerStatsRequest(), metadata=auth.bearer_metadata(self.stack.admin_token), timeout=60
            )

    async def status(self) -> dict[str, Any]:
        total: dict[str, Any] = {
            "agents": 0,
            "enrolled": 0,
            "connected": 0,
            "errors": 0,
            "crashed": 0,
            "cpu_s": 0.0,
            "http_fetched": 0,
            "http_failures": 0,
            "installed": {},
        }
        for s in await self.all({"cmd": "status"}, timeout=60):
            for k in ("agents", "enrolled", "connected", "errors", "crashed", "cpu_s", "http_fetched", "http_failures"):
                total[k] += s[k]
            for code, n in s.get("error_codes", {}).items():
                total.setdefault("error_codes", {})[code] = total.get("error_codes", {}).get(code, 0) + n
            for release, per in s["installed"].items():
                into = total["installed"].setdefault(release, {})
                for v, n in per.items():
                    into[v] = into.get(v, 0) + n
        return total

    async def launch(
        self, *, group: str, count: int, mode: str = "push", full_pull: bool = False, ramp_s: float = 0.0
    ) -> None:
        """Start `count` agents of `group`, spread evenly over the worker processes."""
        log.info("starting %d %s agents (%s)", count, group, mode)
        ids = [(f"{group}-{i:06d}", {"group": group, "os": "android" if i % 5 else "ios"}) for i in range(count)]
        shares = [ids[i :: self.processes] for i in range(self.processes)]
        await asyncio.gather(
            *(
                self.ask(
                    conn,
                    {
                        "cmd": "start",
                        "target": self.stack.controller_address,
                        "bootstrap_token": self.stack.bootstrap_token,
                        "agents": part,
                        "mode": mode,
                        "poll_s": self.poll_s,
                        "full_pull": full_pull,
                        "http": self.blobs == "http",
                        "share": self.share,
                        "ramp_s": ramp_s,
                        "root_pem": self.root_pem,
                    },
                )
                for (_, conn), part in zip(self.workers, shares, strict=True)
                if part
            )
        )

    async def wait(
        self, what: str, done: Callable[[dict[str, Any]], bool], *, timeout: float, every: float = 0.25
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        reported = time.monotonic()
        while True:
            status = await self.status()
            if done(status):
                return status
            if time.monotonic() - reported > 10:
                reported = time.monotonic()
                log.info("%s: %s", what, {k: v for k, v in status.items() if k != "cpu_s"})
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not done within {timeout:.0f}s (status {status})")
            await asyncio.sleep(every)

    async def installed(self, release: str, version: int, count: int, *, timeout: float) -> None:
        await self.wait(
            f"{release} v{version} on {count} agents",
            lambda s: s["installed"].get(release, {}).get(str(version), 0) >= count,
            timeout=timeout,
        )

    async def collect(self, release: str, version: int) -> list[tuple[float, int, float]]:
        records: list[tuple[float, int, float]] = []
        for reply in await self.all({"cmd": "collect", "release": release, "version": version}):
            records.extend(tuple(r) for r in reply["records"])
        return records

    def bundle(self, name: str, *, model: bytes) -> tuple[pathlib.Path, Any]:
        from tether.common import manifest

        root = self.workdir / "bundles" / name
        root.mkdir(parents=True, exist_ok=True)
        files = {
            "task.py": b"def run(ctx):\n    return {'sample_count': 0}\n",
            "config.json": json.dumps({"labels": list(range(64)), "threshold": 0.5}).encode(),
            "vocab.txt": b"\n".join(f"token-{i}".encode() for i in range(256)),
            "model.bin": model,
        }
        for rel, data in files.items():
            (root / rel).write_bytes(data)
        return root, manifest.hash_directory(root, name="bench-task", entrypoint="task.py")

    async def publish(self, release: str, bundle: tuple[pathlib.Path, Any], group: str) -> tuple[float, int]:
        root, m = bundle
        await self.admin.upload_bundle(root, m)
        t0 = time.time()
        applied = await self.admin.apply_release(
            release=release, manifest_digest=m.digest, target={"matchLabels": {"group": group}}
        )
        return t0, applied.version
