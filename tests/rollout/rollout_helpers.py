"""Helpers for the rollout scenarios: a controller on loopback, a simulated fleet, and the operator's decide loop.

The operator loop is the real one minus Kopf: read the release's status from
the controller (AdminService over gRPC), `reconcile.decide` with an injected
clock, perform its actions through the operator's `ControllerAdmin`, fold the
outcomes in. The status it keeps is round-tripped through its JSON form on
every step, as Kubernetes would store it, so nothing survives in memory that
a restarted operator would not see.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
import pathlib
import random
import uuid
from collections.abc import Mapping
from typing import Any

import psycopg
from controller_support import controller_config, start_controller
from psycopg import sql

from tether.common import manifest
from tether.common.admin_client import AdminClient
from tether.controller import devices, server, uploads
from tether.controller.storage import contracts
from tether.operator import reconcile
from tether.operator import release_client as operator_admin
from tether.operator.task_status import MLTaskStatus

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


async def start(database_url: str, tmp_path: pathlib.Path) -> server.RunningController:
    # A scenario commits thousands of small transactions; waiting for each WAL flush is not what it tests.
    with psycopg.connect(database_url, autocommit=True) as conn:
        name = conn.info.dbname
        conn.execute(sql.SQL("ALTER DATABASE {} SET synchronous_commit = off").format(sql.Identifier(name)))
    cfg = controller_config(database_url, tmp_path / "blobs", pool_max_size=12, max_blob_bytes=8 * 1024 * 1024)
    return await start_controller(cfg)


async def upload(client: AdminClient, root: pathlib.Path, files: Mapping[str, bytes]) -> str:
    """A bundle with `files` built under `root` and uploaded; its manifest digest."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    bundle = manifest.hash_directory(root, name="scenario-task", entrypoint="task.py")
    return (await client.upload_bundle(root, bundle)).digest


# ---------------------------------------------------------------- the fleet


@dataclasses.dataclass
class SimDevice:
    device_id: str
    attributes: dict[str, str]

    @property
    def device(self) -> devices.Device:
        return devices.Device(device_id=self.device_id, attributes=self.attributes, backends=("mnn/cpu",))


def mixed_fleet(n: int, *, seed: int = 7) -> list[SimDevice]:
    """`n` devices of mixed attributes: os, osVersion, app version, model, tier, region, a beta label on some."""
    rng = random.Random(seed)
    fleet = []
    for i in range(n):
        attributes = {
            "os": rng.choice(["android", "android", "ios", "linux"]),
            "osVersion": rng.choice(["12", "13", "14", "17.2"]),
            "app": "shop",
            "appVersion": rng.choice(["9.8.0", "10.1.4", "10.2.0", "10.4.1", "11.0.0", "11.3.2", "12.0.0-beta"]),
            "model": rng.choice(["pixel-8", "galaxy-s23", "iphone-15", "rpi-5"]),
            "tier": rng.choice(["high", "mid", "mid", "low"]),
            "region": rng.choice(["eu", "us", "apac"]),
        }
        if rng.random() < 0.05:
            attributes["cohort"] = "beta"
        fleet.append(SimDevice(device_id=f"dev-{i:05d}", attributes=attributes))
    return fleet


async def enroll_all(st: contracts.DeviceRegistry, fleet: list[SimDevice]) -> None:
    gate = asyncio.Semaphore(8)

    async def one(d: SimDevice) -> None:
        info = devices.validate_info(attributes=d.attributes, backends=("mnn/cpu",))
        async with gate:
            await st.enroll_device(device_id=d.device_id, info=info)

    await asyncio.gather(*(one(d) for d in fleet))


async def desired(
    st: contracts.ReleaseLedger, fleet: list[SimDevice], release: str
) -> dict[str, tuple[int, bool] | None]:
    """device id -> (version, rollback flag) of `release` the controller serves it, None when nothing."""
    gate = asyncio.Semaphore(8)

    async def one(d: SimDevice) -> tuple[int, bool] | None:
        async with gate:
            tasks = [t for t in await st.desired_tasks(d.device) if t.release == release]
        return (tasks[0].version, tasks[0].rollback) if tasks else None

    found = await asyncio.gather(*(one(d) for d in fleet))
    return {d.device_id: v for d, v in zip(fleet, found, strict=True)}


@dataclasses.dataclass
class Simulation:
    """Devices that do what they are told: install the version they are served (Sync), run it, report, upload."""

    st: server.RunningController  # reports go through its group commit, the rest straight to its storage
    fleet: list[SimDevice]
    release: str
    last: dict[str, tuple[int, bool]] = dataclasses.field(default_factory=dict)  # what each device acted on last
    concurrency: int = 10

    async def converge(
        self, *, fail: frozenset[str] = frozenset(), accuracy: float = 0.92, duration_s: float = 0.4
    ) -> dict[str, tuple[int, bool] | None]:
        """One round: each device syncs; a version it was not running is installed and run once.

        Devices in `fail` report a failed run (and upload nothing). Returns what each is served.
        """
        served: dict[str, tuple[int, bool] | None] = {}
        gate = asyncio.Semaphore(self.concurrency)

        async def one(d: SimDevice) -> None:
            async with gate:
                served[d.device_id] = await self._device(d, fail=fail, accuracy=accuracy, duration_s=duration_s)

        await asyncio.gather(*(one(d) for d in self.fleet))
        return {d.device_id: served[d.device_id] for d in self.fleet}

    async def _device(
        self, d: SimDevice, *, fail: frozenset[str], accuracy: float, duration_s: float
    ) -> tuple[int, bool] | None:
        tasks = [t for t in await self.st.storage.releases.desired_tasks(d.device) if t.release == self.release]
        if not tasks:
            self.last.pop(d.device_id, None)
            return None
        task = tasks[0]
        key = (task.version, task.rollback)
        if self.last.get(d.device_id, (0, False))[0] == task.version:
            return key  # already running this version
        self.last[d.device_id] = key
        await self.st.storage.releases.mark_synced(device_id=d.device_id, tasks=tasks)
        assert self.st.reporter is not None
        report = self.st.reporter.report_delivery
        await report(device=d.device, release=self.release, version=task.version, state="installed")
        if d.device_id in fail:
            await report(device=d.device, release=self.release, version=task.version, state="failed", message="x")
            return key
        await report(device=d.device, release=self.release, version=task.version, state="succeeded")
        record = uploads.ResultRecord(
            release=self.release,
            version=task.version,
            idempotency_key=f"{d.device_id}:{task.version}:{uuid.uuid4().hex[:8]}",
            sample_count=10,
            metrics={"accuracy": accuracy},
            counts={},
            tensors=(),
            duration_s=duration_s,
        )
        await self.st.storage.results.insert_result(device=d.device, record=record)
        return key


# ---------------------------------------------------------------- the operator loop


@dataclasses.dataclass
class OperatorLoop:
    """decide-then-act against a real controller, with the clock in the test's hands."""

    client: AdminClient
    spec: dict[str, Any]
    name: str = "scenario"
    namespace: str = "ml"
    generation: int = 1
    annotations: dict[str, str] = dataclasses.field(default_factory=dict)
    status_json: dict[str, Any] = dataclasses.field(default_factory=dict)
    now: datetime.datetime = T0
    events: list[reconcile.Event] = dataclasses.field(default_factory=list)

    @property
    def release(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def status(self) -> MLTaskStatus:
        return reconcile.parse_status(self.status_json)

    async def reconcile(self) -> MLTaskStatus:
        current = self.status
        meta = reconcile.Meta(
            name=self.name, namespace=self.namespace, generation=self.generation, annotations=dict(self.annotations)
        )
        observed = None
        if current.release:
            observed = await self.client.get_release_status(current.release)
        decision = reconcile.decide(spec=self.spec, meta=meta, status=current, observed=observed, now=self.now)
        ctl = operator_admin.ControllerAdmin(self.client)
        while decision.actions:
            action = decision.actions[0]
            try:
                outcome: reconcile.Outcome = await ctl.apply(action)  # type: ignore[arg-type]
            except Exception as e:
                outcome = reconcile.failed_from_any(e)
            decision = decision.with_outcome(action, outcome, now=self.now)
        self.events.extend(reconcile.transition_events(current, decision.status))
        self.status_json = decision.status.to_json()  # as the API server would store it
        return self.status

    async def advance(self, seconds: float) -> MLTaskStatus:
        self.now += datetime.timedelta(seconds=seconds)
        return await self.reconcile()


def random_bytes(n: int) -> bytes:
    return os.urandom(n)
