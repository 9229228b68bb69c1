"""A simulated fleet: N real agents in one process, for demos, tests and benchmarks.

Every simulated device is a full `Agent` (own state directory, credential,
gRPC channel, bundle store) with a distinct id, varied attributes and its own
shard of a dataset, written to its data directory. Task workers are real child
processes; a shared semaphore bounds how many run at once, so a fleet of
hundreds does not fork hundreds of workers on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pathlib
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from tether.agent import backends, client, daemon, engine, files, runtime, warmpool
from tether.agent import slots as agent_slots

log = logging.getLogger(__name__)

_ANDROID_MODELS = ("Pixel 7", "Pixel 8 Pro", "Galaxy S23", "Galaxy A14", "Redmi Note 12", "OnePlus 11")
_IOS_MODELS = ("iPhone 12", "iPhone 13 mini", "iPhone 14", "iPhone 15 Pro", "iPhone SE")
_REGIONS = ("eu-west", "eu-central", "us-east", "us-west", "ap-south", "ap-east")


@dataclasses.dataclass(frozen=True)
class SimulatedDevice:
    device_id: str
    attributes: dict[str, str]
    state_dir: pathlib.Path
    data_dir: pathlib.Path


def device_attributes(index: int, *, seed: int = 0) -> dict[str, str]:
    """Deterministic, varied attributes for device `index` (about 3 in 4 run the `shop` app)."""
    rng = random.Random(f"{seed}:{index}")
    os_name = "android" if rng.random() < 0.6 else "ios"
    if os_name == "android":
        os_version, model = str(rng.randint(11, 14)), rng.choice(_ANDROID_MODELS)
    else:
        os_version, model = f"{rng.randint(15, 17)}.{rng.randint(0, 6)}", rng.choice(_IOS_MODELS)
    return {
        "os": os_name,
        "osVersion": os_version,
        "app": "shop" if rng.random() < 0.75 else "maps",
        "appVersion": f"{rng.randint(2, 4)}.{rng.randint(0, 12)}.{rng.randint(0, 9)}",
        "model": model,
        "tier": rng.choice(("low", "mid", "mid", "high")),
        "region": rng.choice(_REGIONS),
    }


def shard_dataset(data: str | os.PathLike[str], count: int, *, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Split an npz of equal-length arrays into `count` shuffled, near-equal shards."""
    with np.load(data, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) != 1:
        raise ValueError(f"{data}: arrays have different lengths {sorted(lengths)}")
    order = np.random.default_rng(seed).permutation(lengths.pop())
    return [{k: a[idx] for k, a in arrays.items()} for idx in np.array_split(order, count)]


def prepare_devices(
    *,
    count: int,
    state_root: str | os.PathLike[str],
    data: str | os.PathLike[str] | None,
    prefix: str = "sim",
    seed: int = 0,
    data_name: str = "digits.npz",
) -> list[SimulatedDevice]:
    root = pathlib.Path(state_root)
    shards = shard_dataset(data, count, seed=seed) if data is not None else [None] * count
    devices = []
    for i, shard in enumerate(shards):
        device_id = f"{prefix}-{i:04d}"
        device_root = root / device_id
        state_dir, data_dir = device_root / "state", device_root / "data"
        state_dir.mkdir(parents=True, exist_ok=True)
        data_dir.mkdir(parents=True, exist_ok=True)
        if shard is not None:
            tmp = data_dir / f".{data_name}.tmp.npz"
            np.savez(tmp, **shard)  # type: ignore[arg-type]  # numpy types **kwds by allow_pickle
            files.atomic_write(data_dir / data_name, tmp.read_bytes())
            tmp.unlink()
        devices.append(SimulatedDevice(device_id, device_attributes(i, seed=seed), state_dir, data_dir))
    return devices


async def run_fleet(
    *,
    count: int,
    controller: str,
    bootstrap_token: str,
    state_root: str | os.PathLike[str],
    data: str | os.PathLike[str] | None = None,
    concurrency: int = 2,
    prefix: str = "sim",
    seed: int = 0,
    limits: runtime.TaskLimits = runtime.TaskLimits(),
    channel_credentials: grpc.ChannelCredentials | None = None,
    trusted_keys: Mapping[str, bytes] | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[list[daemon.Agent]], None] | None = None,
    backoff: client.Backoff = client.Backoff(),
    devices: Sequence[SimulatedDevice] | None = None,
) -> list[daemon.Agent]:
    """Run `count` agents until `stop` is set (or the call is cancelled); returns the stopped agents.

    `on_ready(agents)` is called once every agent holds an open stream. `devices`: the devices, already
    prepared by the caller (ids, attributes, data of its own), instead of `prepare_devices`' (`count` is then
    their number).
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    stop = stop or asyncio.Event()
    if devices is None:
        devices = await asyncio.to_thread(
            prepare_devices, count=count, state_root=state_root, data=data, prefix=prefix, seed=seed
        )
    detected = await asyncio.to_thread(engine.detect_backends)  # once for the whole (identical) fleet
    slots = agent_slots.FairSlots(max(1, concurrency))
    # One zygote and one set of warm workers for the whole fleet (idle ones retire, within the budget).
    workers = warmpool.WorkerPool(work_dir=state_root, settings=warmpool.PoolSettings(max_workers=max(1, concurrency)))
    # Identical devices: one backend selection per model for the whole fleet.
    selector = backends.Selector(
        cache_path=pathlib.Path(state_root) / backends.CACHE_FILE, backends=detected, memory_mb=limits.memory_mb
    )
    agents = [
        daemon.Agent(
            controller=controller,
            state_dir=d.state_dir,
            data_dir=d.data_dir,
            bootstrap_token=bootstrap_token,
            device_id=d.device_id,
            attributes=d.attributes,
            backends=detected,
            channel_credentials=channel_credentials,
            trusted_keys=trusted_keys,
            task_slots=slots,
            workers=workers,
            limits=limits,
            selector=selector,
            backoff=backoff,
            rng=random.Random(f"{seed}:{d.device_id}"),
        )
        for d in devices
    ]
    runs = [asyncio.create_task(a.run(), name=f"agent:{a.device_id}") for a in agents]

    async def announce() -> None:
        await asyncio.gather(*(a.connected.wait() for a in agents))
        log.info("fleet of %d agents connected", len(agents))
        if on_ready is not None:
            on_ready(agents)

    ready = asyncio.create_task(announce())
    # one agent ending does not end the fleet
    finished: asyncio.Future[Any] = asyncio.gather(*runs, return_exceptions=True)
    stopper: asyncio.Future[Any] = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([stopper, finished], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        ready.cancel()
        for a in agents:
            a.stop()
        outcomes = await asyncio.shield(finished) if not finished.done() else finished.result()
        for a, outcome in zip(agents, outcomes, strict=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
                log.error("agent %s ended with %s: %s", a.device_id, type(outcome).__name__, outcome)
        await workers.close()
    return agents
