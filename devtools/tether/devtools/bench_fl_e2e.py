"""examples/digits-fl run by the whole system: the end-to-end `RoundPath` of `tether bench fl`, and `tether demo
--scenario fl`.

`FederatedRun` starts what a deployment runs (`tether.devtools.stack`: an
embedded PostgreSQL, the broker, the controller process with its round driver,
a Celery worker process) and N real agents (`tether.devtools.fleet`: the
agent's own code, task workers kept warm and shared), each device holding its
shard of the Dirichlet split (`fldata`) as `<data_dir>/digits.npz`. It uploads
the digits-fl bundle (signed with the stack's key, which the fleet trusts and
the controller signs derived versions with) and applies its federated release
through the admin API, as the operator does (`ApplyRelease` with
`federated_json`): FedAvg, `per_round` participants, quorum all, so a round
closes as soon as its last selected update is in; the deadline only catches a
lost device.

From then on the controller drives the rounds by itself. The bench follows:
each published round's model is read back with `ExportRoundModel` (what `tether
fl export` does) and scored on the held-out set in the bench's process, and the
rounds' own timestamps (PostgreSQL's `fl_rounds` / `fl_participants`: opened,
each update received, result served) give the round times and where they go.

`EndToEndPath` is the `bench_fl_sim.RoundPath` over a run: round r waits for
the controller's round r + 1 and checks that its participants are the ones the
bench drew (the driver's seeded draw over the same devices), so the curves of
Flower, the in-process strategies and this path compare round by round.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pathlib
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from tether.controller.fl import aggregators
from tether.devtools import bench_fl_sim, fldata
from tether.devtools import fleet as fleet_mod
from tether.devtools import stack as stack_mod
from tether.spec import strategies

T = TypeVar("T")
PATH_NAME = "end-to-end: real agents, gRPC, PostgreSQL, Celery worker"


class RunFailed(RuntimeError):
    """The federated run did not go as the bench needs (a round failed, participants differ, a timeout)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    per_round: int = 10
    rounds: int = 30
    seed: int = 0
    deadline_s: int = 120  # a safety net only: rounds close when every selected update is in (quorum = all)
    driver_interval_s: float = 0.1  # the driver is also woken when a round's last update or its model arrives
    concurrency: int = 2  # warm task workers the whole fleet shares (the machine's cores)
    tls: bool = True
    sign: bool = True
    round_timeout_s: float = 300.0

    def federated(self) -> dict[str, Any]:
        """The release's `spec.federated` (examples/digits-fl/mltask.yaml's, quorum all, no server evaluation)."""
        return {
            "rounds": self.rounds,
            "participants": {"count": self.per_round},
            "seed": self.seed,
            "roundDeadlineSeconds": self.deadline_s,
            "onQuorumMissed": "fail",
            "lateUpdates": "refuse",
            "strategy": {"name": "fedAvg"},
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoundRecord:
    """A round as PostgreSQL holds it (epoch seconds; None while not there yet)."""

    number: int
    phase: str
    selected: tuple[str, ...]
    received: tuple[str, ...]
    refused: int
    samples: int | None
    opened: float
    first_update: float | None
    last_update: float | None
    served: float | None  # the derived version holding the round's model applied (`result_version` written)
    version: int | None

    @property
    def wall_s(self) -> float | None:
        """Round opened -> its model published as the release's version."""
        return None if self.served is None else self.served - self.opened

    def pace(self) -> dict[str, float] | None:
        """Where the round's time went: selection and training until the last update, then aggregation and the
        derived version."""
        if self.served is None or self.first_update is None or self.last_update is None:
            return None
        return {
            "open_to_first_update_s": self.first_update - self.opened,
            "first_to_last_update_s": self.last_update - self.first_update,
            "last_update_to_served_s": self.served - self.last_update,
        }


ROUNDS_SQL = """
SELECT r.number, r.phase, r.refused, r.samples, r.result_version,
       extract(epoch FROM r.created_at)::float8,
       CASE WHEN r.result_version IS NULL THEN NULL ELSE extract(epoch FROM r.updated_at)::float8 END,
       coalesce(array_agg(p.device_id ORDER BY p.position) FILTER (WHERE p.device_id IS NOT NULL), '{}'),
       coalesce(array_agg(p.device_id ORDER BY p.received_position)
                FILTER (WHERE p.received_position IS NOT NULL), '{}'),
       extract(epoch FROM min(p.received_at))::float8, extract(epoch FROM max(p.received_at))::float8
FROM fl_rounds r LEFT JOIN fl_participants p ON p.task = r.task AND p.number = r.number
WHERE r.task = %s GROUP BY r.task, r.number ORDER BY r.number
"""


def device_shards(split: fldata.Split, root: pathlib.Path, *, seed: int) -> list[fleet_mod.SimulatedDevice]:
    """One simulated device per shard, named as the split names it, its shard in `<data_dir>/digits.npz`; every
    device runs the `shop` app, which the release targets (so every connected device is eligible)."""
    devices = []
    for i, shard in enumerate(split.shards):
        state_dir, data_dir = root / shard.device / "state", root / shard.device / "data"
        state_dir.mkdir(parents=True, exist_ok=True)
        data_dir.mkdir(parents=True, exist_ok=True)
        np.savez(data_dir / "digits.npz", X=shard.X, y=shard.y)
        attributes = {**fleet_mod.device_attributes(i, seed=seed), "app": "shop"}
        devices.append(fleet_mod.SimulatedDevice(shard.device, attributes, state_dir, data_dir))
    return devices


class FederatedRun:
    """The stack, the fleet and the applied federated release (async; `start`, then `published`, then `stop`)."""

    def __init__(
        self,
        config: Config,
        *,
        split: fldata.Split,
        example: pathlib.Path,
        stack: stack_mod.StackConfig | None = None,
    ) -> None:
        """`stack`: the services to use or start (`tether demo`'s options); its agent count and driver interval
        are this run's."""
        self.config = config
        self.split = split
        self.example = example
        self.task = bench_fl_sim.TASK_NAME
        base = stack or stack_mod.StackConfig(tls=config.tls, sign=config.sign)
        self.stack = stack_mod.LocalStack(
            dataclasses.replace(base, agents=len(split.shards), fl_driver_interval=config.driver_interval_s)
        )
        self._fleet: asyncio.Task[Any] | None = None
        self._stop = asyncio.Event()
        self._admin: Any = None
        self._tmpdir: tuple[str | None] | None = None  # TMPDIR before the fleet started, restored by stop
        self.timings: dict[str, float] = {}

    async def start(self, *, say: Any = None) -> None:
        """Services, controller, worker and fleet up, the bundle uploaded, the federated release applied."""
        say = say or (lambda text: None)
        t = time.monotonic()
        await self.stack.start_services()
        await asyncio.gather(self.stack.start_controller(), self.stack.start_worker())
        self.timings["stack_s"] = time.monotonic() - t
        say(f"stack up: PostgreSQL, broker, controller {self.stack.controller_address}, Celery worker")
        t = time.monotonic()
        await self._start_fleet()
        self.timings["fleet_s"] = time.monotonic() - t
        say(f"{len(self.split.shards)} agents connected, each with its own shard")
        self._admin = self.stack.admin_client()
        await self._admin.__aenter__()
        await self._apply()
        say(f"release {self.task} applied: {self.config.federated()}")

    async def _start_fleet(self) -> None:
        from tether.common import signing

        # The fleet runs in this process: its task workers (and the engines' session files) keep their temporary
        # files in the stack's directory, as the stack's own components do, so a stop removes every trace.
        self._tmpdir = (os.environ.get("TMPDIR"),)
        scratch = self.stack.workdir / "tmp" / "fleet"
        scratch.mkdir(parents=True, exist_ok=True)
        os.environ["TMPDIR"] = str(scratch)
        tempfile.tempdir = None
        root = self.stack.workdir / "devices"
        devices = await asyncio.to_thread(device_shards, self.split, root, seed=self.config.seed)
        ready = asyncio.Event()
        trusted = None if self.stack.trusted_key is None else signing.load_trusted_keys([self.stack.trusted_key])
        self._fleet = asyncio.create_task(
            fleet_mod.run_fleet(
                count=len(devices),
                controller=self.stack.controller_address,
                bootstrap_token=self.stack.bootstrap_token,
                state_root=root,
                concurrency=self.config.concurrency,
                channel_credentials=self.stack.client_tls().channel_credentials(),
                trusted_keys=trusted,
                stop=self._stop,
                on_ready=lambda agents: ready.set(),
                devices=devices,
            )
        )
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait([waiter, self._fleet], timeout=120, return_when=asyncio.FIRST_COMPLETED)
        if not ready.is_set():
            waiter.cancel()
            raise RunFailed("the fleet did not connect within 120 s (see the stack's logs)")

    async def _apply(self) -> None:
        from tether.common.bundle_files import build_manifest

        bundle_dir = self.example / "task"
        body = build_manifest(bundle_dir)
        signature = self.stack.sign(body)
        signed = {} if signature is None else {"signature": signature.signature, "key_id": signature.key_id}
        upload = await self._admin.upload_bundle(bundle_dir, body, **signed)
        await self._admin.apply_release(
            release=self.task,
            manifest_digest=upload.digest,
            target={"matchLabels": {"app": "shop"}},
            trigger={"type": "onDemand"},
            resources={"timeoutSeconds": 120, "memoryMB": 1024, "cpuSeconds": 60},
            federated=self.config.federated(),
        )

    async def rounds(self) -> list[RoundRecord]:
        import psycopg

        async with await psycopg.AsyncConnection.connect(str(self.stack.database_url), autocommit=True) as conn:
            rows = await (await conn.execute(ROUNDS_SQL, (self.task,))).fetchall()
        return [
            RoundRecord(
                number=n,
                phase=phase,
                refused=refused,
                samples=samples,
                version=version,
                opened=opened,
                served=served,
                selected=tuple(selected),
                received=tuple(received),
                first_update=first,
                last_update=last,
            )
            for n, phase, refused, samples, version, opened, served, selected, received, first, last in rows
        ]

    async def current(self) -> RoundRecord | None:
        """The latest round (None before the first opens)."""
        rows = await self.rounds()
        return rows[-1] if rows else None

    async def published(self, number: int) -> RoundRecord:
        """Wait for round `number`'s model to be served (RunFailed if the round fails or times out)."""
        deadline = time.monotonic() + self.config.round_timeout_s
        while True:
            for r in await self.rounds():
                if r.number == number and r.phase == "Failed":
                    raise RunFailed(f"round {number} failed: {r}")
                if r.number == number and r.served is not None:
                    return r
            if self._fleet is not None and self._fleet.done():
                raise RunFailed("the fleet stopped")
            if time.monotonic() > deadline:
                raise RunFailed(f"round {number} was not published within {self.config.round_timeout_s:.0f} s")
            await asyncio.sleep(0.05)

    async def model(self, number: int) -> dict[str, np.ndarray]:
        """Round `number`'s global model as `tether fl export` reads it (round 0: the bundle's own)."""
        from tether.common import tensorfiles

        with tempfile.TemporaryDirectory(dir=self.stack.workdir) as tmp:
            path = pathlib.Path(tmp) / f"round{number}.safetensors"
            await self._admin.export_round_model(self.task, number, path)
            return dict(tensorfiles.load(path.read_bytes()))

    async def status(self) -> Any:
        return await self._admin.get_release_status(self.task)

    async def stop(self) -> None:
        self._stop.set()
        if self._fleet is not None:
            await asyncio.gather(self._fleet, return_exceptions=True)
        if self._admin is not None:
            await self._admin.__aexit__(None, None, None)
        await self.stack.stop()
        if self._tmpdir is not None:
            (before,) = self._tmpdir
            if before is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = before
            tempfile.tempdir = None


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """File descriptor 1 on stderr meanwhile: the fleet's zygote, started on the first run, inherits it, and MNN's
    import prints a banner there, where `tether bench fl` writes its JSON report."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def summary(records: Sequence[RoundRecord]) -> dict[str, Any]:
    """The e2e run's round times from the rounds' own timestamps, and what set their pace (medians)."""
    walls = [r.wall_s for r in records if r.wall_s is not None]
    paces = [p for p in (r.pace() for r in records) if p is not None]
    pace = {k: statistics.median(p[k] for p in paces) for k in paces[0]} if paces else {}
    return {"round_s_all": walls, "round_s": statistics.median(walls) if walls else None, "pace": pace}


class EndToEndPath:
    """`bench_fl_sim.RoundPath` over a `FederatedRun` on an event loop in a thread of its own."""

    name = PATH_NAME

    def __init__(self, config: Config, *, split: fldata.Split, example: pathlib.Path) -> None:
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fl-e2e", daemon=True)
        self._thread.start()
        self.run = self._call(self._make(config, split, example))
        self.records: list[RoundRecord] = []

    @staticmethod
    async def _make(config: Config, split: fldata.Split, example: pathlib.Path) -> FederatedRun:
        return FederatedRun(config, split=split, example=example)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self, *, say: Any = None) -> None:
        self._call(self.run.start(say=say))

    def initial(self) -> dict[str, np.ndarray]:
        return self._call(self.run.model(0))

    def round(
        self,
        *,
        strategy: strategies.Strategy,
        global_model: bench_fl_sim.Weights,
        state: aggregators.ServerState,
        participants: Sequence[str],
        round_index: int,
        poisoned: frozenset[str],
    ) -> bench_fl_sim.RoundResult:
        if type(strategy) is not strategies.FedAvg or poisoned:
            raise RunFailed("the end-to-end path runs the release's FedAvg, unpoisoned")
        record = self._call(self.run.published(round_index + 1))
        if tuple(sorted(record.selected)) != tuple(participants):
            raise RunFailed(
                f"round {record.number}: the controller selected {sorted(record.selected)}, "
                f"the bench drew {list(participants)}"
            )
        model = self._call(self.run.model(record.number))
        self.records.append(record)
        delta = {n: model[n].astype(np.float64) - global_model[n].astype(np.float64) for n in model}
        outcome = aggregators.Outcome(
            model=model,
            state=state,
            devices=tuple(sorted(record.received)),
            samples=record.samples or 0,
            chosen=tuple(sorted(record.received)),
            delta=delta,
        )
        return bench_fl_sim.RoundResult(outcome=outcome, refused=record.refused)

    def close(self) -> None:
        try:
            self._call(self.run.stop(), timeout=120)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()
