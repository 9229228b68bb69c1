"""The round driver: a thin async loop in the controller that performs `fl.driver.decide`'s steps.

For every live federated release, under a per-task lock (a Postgres advisory
lock, so one replica decides for a task at a time), it reads the situation,
asks `decide`, performs the step, and asks again until the answer is to wait:

- `OpenRound` / `Move`: `RoundBook.create_round` / `update_round` (the round
  row is the truth; a replica that lost a race gets FailedPrecondition and
  reads again next time);
- `Aggregate`: sends `tether.fl.aggregate_round` (idempotent on (task, round));
- `Advance`: derives the bundle version that serves the round's model
  (`fl.publishing.derive_manifest`: the base manifest with the model file
  replaced), signs it with the controller's key when it has one, stores it
  and applies it as the release's manifest, telling no device yet.

Every replica (lock or not) tells the selected devices it holds a stream for:
the round's version (a Notify through `FanOut.release_changed(..., only=...)`:
they pull the one changed blob), then RunNow(release, version, request_id
"round-<n>", payload {"federated": ...}) on the same stream, once per device
and round on this replica; the agent runs it when that version is installed,
and runs a request id once. A device not selected is not moved by a round;
when the run is done the last model goes to every targeted device connected
here (a device that connects later gets it in its Sync).
Eligible devices: those connected to this replica that the release targets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from tether.common import errors, signing
from tether.controller import blobstores, fanout, hub, release_cache, releases
from tether.controller.fl import driver, publishing, rounds
from tether.controller.storage import contracts
from tether.proto.v1 import tether_pb2 as pb

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)

MAX_STEPS = 8  # per task and pass: a round opens, selects and is told in one pass


ROLLBACK_LOCK_WAIT_S = 10.0  # a rollback waits this long for a driver pass on the task to end


class TaskLock(Protocol):
    def hold(self, task: str, *, wait_s: float = 0.0) -> contextlib.AbstractAsyncContextManager[bool]:
        """True inside when this process may drive `task` now (waiting up to `wait_s` for it)."""
        ...


class LocalLock:
    """One process: always granted (memory storage, tests)."""

    @contextlib.asynccontextmanager
    async def hold(self, task: str, *, wait_s: float = 0.0) -> AsyncIterator[bool]:
        yield True


class AdvisoryLock:
    """A transaction-scoped Postgres advisory lock per task, held while one pass drives it."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    @contextlib.asynccontextmanager
    async def hold(self, task: str, *, wait_s: float = 0.0) -> AsyncIterator[bool]:
        """`wait_s` 0: a driver pass skips a task another replica (or this one's pass) holds; an admin call
        (a rollback) waits for the pass in progress to end, which takes milliseconds."""
        deadline = time.monotonic() + wait_s
        async with self._pool.connection() as conn, conn.transaction():
            while True:
                row = await (
                    await conn.execute(
                        "SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))", ("tether-fl:" + task,)
                    )
                ).fetchone()
                got = bool(row and row[0])
                if got or time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.05)
            yield got


def payload(rules_doc: dict[str, Any], r: rounds.Round, *, params: dict[str, float]) -> str:
    """What the task gets in ctx.inputs["payload"] (docs/task-api.md, "Federated tasks")."""
    fed: dict[str, Any] = {
        "task": r.task,
        "round": r.number,
        "modelFile": rules_doc.get("modelFile", "model.safetensors"),
        "updateEncoding": rules_doc.get("updateEncoding", "float32"),
        **params,
    }
    return json.dumps({"federated": fed}, sort_keys=True)


class RoundDriver:
    def __init__(
        self,
        *,
        storage: contracts.Storage,
        releases_: release_cache.ReleaseCache,
        fan_out: fanout.FanOut,
        hub_: hub.Hub,
        blob_store: blobstores.BlobBackend,
        send_aggregate: Callable[[str, int], Awaitable[None]],
        lock: TaskLock | None = None,
        signing_key: Ed25519PrivateKey | None = None,
        clock: Callable[[], float] = time.time,
        interval_s: float = 1.0,
    ) -> None:
        self._storage = storage
        self._releases = releases_
        self._fan_out = fan_out
        self._hub = hub_
        self._blobs = blob_store
        self._send_aggregate = send_aggregate
        self._lock = lock or LocalLock()
        self._key = signing_key
        self._clock = clock
        self._interval_s = interval_s
        self._wake = asyncio.Event()
        self._stopping = False
        self._told: dict[tuple[str, int], set[str]] = {}
        self._aggregate_sent: dict[tuple[str, int], float] = {}
        self.done: dict[str, str] = {}  # task -> why its run stopped

    def poke(self) -> None:
        """Look again now (an update completed a round, a round was published)."""
        self._wake.set()

    def stop(self) -> None:
        """End `run` after the pass in progress (also when a library turns the task's cancellation into an error)."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        while not self._stopping:
            try:
                await self.pass_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._stopping:
                    break
                log.exception("round driver pass failed; trying again")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval_s)

    async def pass_once(self) -> None:
        for rel in await self._storage.releases.list_releases():
            if rel.deleted or not rel.spec.federated:
                continue
            await self.drive(rel.name)

    async def drive(self, task: str) -> driver.Step | None:
        """Drive one task until it waits; returns the last step (None when another replica holds it)."""
        async with self._lock.hold(task) as mine:
            step: driver.Step | None = None
            if mine:
                for _ in range(MAX_STEPS):
                    step = await self._step(task)
                    if step is None or isinstance(step, driver.Wait | driver.Done):
                        break
        await self._tell(task)
        return step

    async def _step(self, task: str) -> driver.Step | None:
        rel = await self._storage.releases.get_release(task)
        rules = None if rel is None else rel.spec.rules()
        if rel is None or rules is None or rel.paused:
            return None
        stored = await self._storage.bundles.get_manifest(rel.manifest_digest)
        if stored is None:
            return None
        serving = publishing.model_entry(stored.body, model_file=rules.model_file)
        latest = await self._storage.rounds.latest_round(task=task)
        result = None
        history: list[float | None] = []
        published = 0
        if latest is not None:
            result = await self._storage.rounds.round_result(task=task, number=latest.number)
            for r in await self._storage.rounds.rounds_of(task=task):
                if r.phase is rounds.Phase.PUBLISHED:
                    published += 1
                    res = await self._storage.rounds.round_result(task=task, number=r.number)
                    history.append(rounds.followed_metric(res, rules=rules))
        eligible = [d for d in self._hub.device_ids() if self._targets(rel, d)]
        situation = driver.Situation(
            task=task,
            rules=rules,
            serving_model=serving.sha256,
            serving_version=rel.version,
            latest=latest,
            latest_result=result,
            history=history,
            published=published,
            eligible=eligible,
            now=self._clock(),
            aggregate_sent_at=None if latest is None else self._aggregate_sent.get((task, latest.number)),
        )
        step = driver.decide(situation)
        try:
            await self._act(rel, rules.model_file, step)
        except errors.FailedPrecondition as e:  # another replica moved first: read again next pass
            log.info("round step for %s not taken: %s", task, e)
            return driver.Wait(reason=str(e))
        if isinstance(step, driver.Done) and self.done.get(task) != step.reason:
            self.done[task] = step.reason
            log.info("federated run of %s is done: %s", task, step.reason)
            final = await self._storage.releases.get_release(task)
            if final is not None:  # the last global model, to every targeted device connected here
                await self._fan_out.release_changed(None, final)
        return step

    def _targets(self, rel: releases.Release, device_id: str) -> bool:
        facts = self._hub.facts_of(device_id)
        return facts is not None and rel.targets(facts)

    async def _act(self, rel: releases.Release, model_file: str, step: driver.Step) -> None:
        if isinstance(step, driver.OpenRound):
            await self._storage.rounds.create_round(step.round)
            log.info(
                "round %d of %s opened (model %s, v%d)", step.round.number, rel.name, step.round.model, rel.version
            )
        elif isinstance(step, driver.Move):
            moved = await self._storage.rounds.update_round(step.round, expected=step.expected)
            log.info("round %d of %s: %s (%s)", moved.number, rel.name, moved.phase, moved.reason)
        elif isinstance(step, driver.Aggregate):
            await self._send_aggregate(step.task, step.number)
            self._aggregate_sent[(step.task, step.number)] = self._clock()
        elif isinstance(step, driver.Advance):
            await self._advance(rel, model_file, step)

    async def _advance(self, rel: releases.Release, model_file: str, step: driver.Advance) -> None:
        size = await self._blobs.size(step.model)
        if size is None:
            raise errors.NotFound(f"round {step.number}'s model {step.model} is not in the blob store")
        await self.serve_model(rel, model_file=model_file, model=step.model, size=size)
        current = await self._storage.releases.get_release(rel.name)
        assert current is not None
        await self._storage.rounds.mark_served(
            task=rel.name, number=step.number, manifest=current.manifest_digest, version=current.version
        )

    async def serve_model(self, rel: releases.Release, *, model_file: str, model: str, size: int) -> releases.Release:
        """Make the release serve `model` as its `model_file` (a derived, signed bundle version); the new release."""
        base = await self._storage.bundles.get_manifest(rel.manifest_digest)
        if base is None:
            raise errors.NotFound(f"manifest {rel.manifest_digest} of {rel.name} is gone")
        body = publishing.derive_manifest(base.body, model_file=model_file, digest=model, size=size)
        sig = signing.sign(body, self._key) if self._key is not None else None
        await self._storage.bundles.put_blob(digest=model, size=size)
        digest = await self._storage.bundles.put_manifest(
            body=body, signature=sig.signature if sig else b"", key_id=sig.key_id if sig else ""
        )
        spec = dataclasses.replace(rel.spec, manifest_digest=digest, base_manifest=rel.spec.base_manifest)
        outcome = await self._releases.apply_release(spec)
        if outcome.changed:
            # Nobody is told now: the next round's participants are, just before their RunNow (`_tell`), and
            # every targeted device once the run is done. A round does not move every device's model.
            await self._fan_out.release_changed(outcome.previous, outcome.release, only=())
        log.info("%s v%d serves model %s", rel.name, outcome.release.version, model)
        return outcome.release

    async def model_of(self, task: str, number: int) -> tuple[str, int]:
        """Round `number`'s published model (round 0: the base bundle's), as (blob digest, size)."""
        rel = await self._storage.releases.get_release(task)
        rules = None if rel is None else rel.spec.rules()
        if rel is None or rules is None:
            raise errors.NotFound(f"release {task} does not exist or is not federated")
        if number == 0:
            base = await self._storage.bundles.get_manifest(rel.spec.base_manifest or rel.manifest_digest)
            if base is None:
                raise errors.NotFound(f"the base manifest of {task} is gone")
            entry = publishing.model_entry(base.body, model_file=rules.model_file)
            return entry.sha256, entry.size
        result = await self._storage.rounds.round_result(task=task, number=number)
        if result is None:
            raise errors.NotFound(f"round {number} of {task} has published no model")
        size = await self._blobs.size(result.model)
        if size is None:
            raise errors.NotFound(f"round {number}'s model {result.model} is not in the blob store")
        return result.model, size

    async def rollback(self, task: str, number: int) -> tuple[releases.Release, str, int]:
        """Serve round `number`'s model again; a live round (training from another model) is cancelled."""
        model, size = await self.model_of(task, number)
        rel = await self._storage.releases.get_release(task)
        rules = None if rel is None else rel.spec.rules()
        assert rel is not None and rules is not None
        cancelled = 0
        async with self._lock.hold(task, wait_s=ROLLBACK_LOCK_WAIT_S) as mine:
            if not mine:
                raise errors.FailedPrecondition(f"another controller replica is driving {task} now; try again")
            live = await self._storage.rounds.latest_round(task=task)
            if live is not None and live.phase not in rounds.TERMINAL:
                reason = f"cancelled: rolled back to round {number}'s model"
                await self._storage.rounds.update_round(rounds.cancel(live, reason=reason), expected=live.phase)
                cancelled = live.number
            served = await self.serve_model(rel, model_file=rules.model_file, model=model, size=size)
        log.warning("%s rolled back to round %d's model %s (v%d)", task, number, model, served.version)
        return served, model, cancelled

    async def _tell(self, task: str) -> None:
        """RunNow to the selected devices of the live round that this replica holds and has not told yet."""
        r = await self._storage.rounds.latest_round(task=task)
        if r is None or r.phase not in rounds.ACCEPTING:
            return
        rel = await self._storage.releases.get_release(task)
        rules = None if rel is None else rel.spec.rules()
        if rel is None or rules is None:
            return
        told = self._told.setdefault((task, r.number), set())
        todo = [d for d in r.selected if d not in told and d not in r.received and self._hub.is_connected(d)]
        if not todo:
            return
        run = pb.RunNow(
            release=task,
            version=r.version,
            request_id=f"round-{r.number}",
            payload_json=payload(dict(rel.spec.federated), r, params=rules.task_parameters()),
        )
        # The round's version goes to its participants only, then the RunNow (one queue: the Notify first).
        await self._fan_out.release_changed(None, rel, only=todo)
        sent = self._hub.run_on(todo, run)
        told.update(sent)
        log.info("round %d of %s: RunNow sent to %d devices", r.number, task, len(sent))
