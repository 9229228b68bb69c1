"""`tether bench fleet`: thousands of simulated agents against one real controller process.

What runs: an embedded PostgreSQL and redis-server (or the services named by
--database-url / --broker-url), one `tether controller` process, and
`--processes` worker processes, each holding its share of the fleet as
`tether.devtools.simagent.SimAgent`s (real gRPC clients, one TCP connection per
agent unless --share groups them onto shared HTTP/2 connections) on one event
loop. The controller's own counters (`StatsService.GetServerStats`: serialized
bytes per RPC, RSS, CPU) are read before and after each phase.

Phases, in order (each measured, unless the output says "modelled"):
1. connect: every push agent enrols and subscribes → max_connected_agents,
   server_rss_bytes_per_agent (RSS growth over the idle controller, / agents).
2. idle (push): messages per second per agent and controller CPU while nothing changes.
3. rollout v1 to the whole fleet → notify_s and install_s, from the moment
   ApplyRelease was sent to each agent's receipt of the Notify / verified install.
4. v2 changes one file → bytes moved per agent / that file's size.
5. push-whole-bundle baseline: a smaller group of agents that pull every blob
   of a new version (what pushing the whole bundle would move), same update.
6. polling baseline: a fleet (up to --poll-agents) polling GetDesired every
   --poll-interval seconds at uniform phases: idle load, then the same v1 rollout.
   Its install times are measured; for fleet sizes beyond the polling fleet,
   the output also gives the model (uniform phase + the measured pull time).

Ratios compare per-agent figures, so the polling fleet may be smaller.

Where blobs come from (`--blobs`): `grpc` (the controller streams them with
PullBlobs) or `http` (an nginx origin serves the controller's blob directory;
the controller hands each device signed URLs and the agents fetch by URL, as
the real agent does). Each mode's JSON adds `blobs`,
`controller_cpu_s_per_install` and `controller_bytes_per_install` (the v1
rollout's controller CPU and device-RPC bytes / installs); bytes *moved* (the
byte ratios) count the controller's and the origin's. `both` runs the two
modes one after the other in one invocation, each on a fresh stack, and adds
`cpu_per_install_ratio` (http / grpc).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pathlib
import platform
import random
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

import click

from tether.devtools import simfleet
from tether.devtools.bench_figures import (
    compare_modes,
    device_bytes,
    device_messages,
    machine_busy_s,
    modelled_polling_install,
    percentiles,
    ratio,
)

log = logging.getLogger(__name__)

RELEASE = "bench/fleet"
FULL_RELEASE = "bench/full"
POLL_RELEASE = "bench/poll"
BLOB_MODES = ("grpc", "http")


# ---------------------------------------------------------------- the run


class FleetBench:
    def __init__(
        self,
        *,
        agents: int,
        processes: int,
        share: int,
        poll_agents: int,
        poll_interval: float,
        full_agents: int,
        idle_s: float,
        model_kib: int,
        database_url: str | None,
        broker_url: str | None,
        workdir: pathlib.Path,
        ramp_s: float | None,
        tls: bool = False,
        connect_only: bool = False,
        pull_rate: float | None = None,
        controller_args: tuple[str, ...] = (),
        blobs: str = "grpc",
    ) -> None:
        if blobs not in BLOB_MODES:
            raise ValueError(f"blobs must be one of {', '.join(BLOB_MODES)}, not {blobs!r}")
        self.blobs = blobs
        self.n = agents
        self.pull_rate = pull_rate
        self.connect_only = connect_only
        self.tls = tls
        self.processes = max(1, processes)
        self.share = max(1, share)
        self.poll_n = min(poll_agents, agents) if poll_agents > 0 else 0
        self.poll_s = poll_interval
        self.full_n = max(1, min(full_agents, agents))
        self.idle_s = idle_s
        self.model_bytes = model_kib * 1024
        self.workdir = workdir
        self.ramp_s = ramp_s if ramp_s is not None else agents / 1500
        self.fleet = simfleet.SimulatedFleet(
            processes=self.processes,
            share=self.share,
            poll_s=poll_interval,
            workdir=workdir,
            database_url=database_url,
            broker_url=broker_url,
            tls=tls,
            pull_rate=pull_rate,
            controller_args=controller_args,
            blobs=blobs,
        )

    # ------------------------------------------------------------ phases
    async def run(self) -> dict[str, Any]:
        await self.fleet.start()
        try:
            return await self._measure()
        finally:
            await self.fleet.stop()

    async def _measure(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "blobs": self.blobs,
            "agents": self.n,
            "processes": self.processes,
            "share_connections": self.share,
            "pull_rate": self.pull_rate,  # None: the controller's default (tether controller --pull-rate)
        }
        base: dict[str, Any] = {}
        details: dict[str, Any] = {}
        rng = random.Random(7)
        v1 = self.fleet.bundle("v1", model=rng.randbytes(self.model_bytes))
        v2 = self.fleet.bundle("v2", model=rng.randbytes(self.model_bytes))  # only model.bin differs
        v2_file = self.model_bytes

        # 1. connect
        log.info("controller at %s; reading its idle counters", self.fleet.stack.controller_address)
        idle = await self.fleet.stats()
        sim0 = (await self.fleet.status())["cpu_s"]
        t0 = time.monotonic()
        await self.fleet.launch(group="push", count=self.n, ramp_s=self.ramp_s)
        await self.fleet.wait("connect", lambda s: s["connected"] >= self.n, timeout=120 + self.n / 50)
        connect_s = time.monotonic() - t0
        await asyncio.sleep(2)  # let allocations settle
        connected = await self.fleet.stats()
        sim1 = (await self.fleet.status())["cpu_s"]
        out["max_connected_agents"] = int(connected.connected_devices)
        out["server_rss_bytes_per_agent"] = round((connected.rss_bytes - idle.rss_bytes) / max(1, self.n))
        base["max_connected_agents"] = {"requested": self.n}
        base["server_rss_bytes_per_agent"] = {
            "idle_server_rss_bytes": idle.rss_bytes,
            "connected_server_rss_bytes": connected.rss_bytes,
        }
        details["connect"] = {
            "seconds": round(connect_s, 2),
            "open_fds": connected.open_fds,
            "server_cpu_s": round(connected.cpu_seconds - idle.cpu_seconds, 2),
            "simulator_cpu_s": round(sim1 - sim0, 2),
        }

        if self.connect_only:
            out["baselines"], out["details"] = base, details
            out["method"] = {"measured": ["max_connected_agents", "server_rss_bytes_per_agent"], "modelled": []}
            return out

        # 2. idle load with push
        a = await self.fleet.stats()
        await asyncio.sleep(self.idle_s)
        b = await self.fleet.stats()
        push_idle = {
            "messages_per_s_per_agent": device_messages(a, b) / self.idle_s / self.n,
            "server_cpu_per_s": (b.cpu_seconds - a.cpu_seconds) / self.idle_s,
        }

        # 3. rollout v1 to the whole fleet
        before = await self.fleet.stats()
        sim0 = (await self.fleet.status())["cpu_s"]
        busy0 = machine_busy_s()
        origin0 = self.fleet.origin_served()
        t_apply, version = await self.fleet.publish(RELEASE, v1, "push")
        await self.fleet.installed(RELEASE, version, self.n, timeout=120 + self.n / 20)
        after = await self.fleet.stats()
        sim1 = (await self.fleet.status())["cpu_s"]
        busy1 = machine_busy_s()
        origin1 = self.fleet.origin_served()
        records = await self.fleet.collect(RELEASE, version)
        out["notify_s"] = percentiles([heard - t_apply for heard, _, _ in records])
        out["install_s"] = percentiles([inst - t_apply for _, _, inst in records if inst])
        pull_s = [inst - heard for heard, _, inst in records if inst]
        server_cpu_s = after.cpu_seconds - before.cpu_seconds
        out["controller_cpu_s_per_install"] = round(server_cpu_s / self.n, 6)
        out["controller_bytes_per_install"] = round(device_bytes(before, after) / self.n)
        base["controller_cpu_s_per_install"] = {"installs": self.n, "server_cpu_s": round(server_cpu_s, 3)}
        base["controller_bytes_per_install"] = {
            "installs": self.n,
            "device_rpc_bytes": device_bytes(before, after),
        }
        details["v1"] = {
            "fanout_to_receipt_s": percentiles([heard - sent / 1000 for heard, sent, _ in records if sent]),
            "pull_after_notify_s": percentiles(pull_s),
            "bytes_per_agent": device_bytes(before, after) / self.n,
            "origin_bytes_per_agent": (origin1[1] - origin0[1]) / self.n,
            "origin_requests": origin1[0] - origin0[0],
            "bundle_bytes": sum(f.size for f in v1[1].files),
            "server_cpu_s": round(after.cpu_seconds - before.cpu_seconds, 2),
            "simulator_cpu_s": round(sim1 - sim0, 2),
            # Everything else busy meanwhile: PostgreSQL, the kernel, the benchmark itself.
            "other_cpu_s": round((busy1 - busy0) - (after.cpu_seconds - before.cpu_seconds) - (sim1 - sim0), 2),
            "machine_cores": os.cpu_count(),
            "wall_s": round(max((i for _, _, i in records if i), default=t_apply) - t_apply, 2),
        }

        # 4. a version that changes one file
        before, origin0 = await self.fleet.stats(), self.fleet.origin_served()
        t_apply2, version2 = await self.fleet.publish(RELEASE, v2, "push")
        await self.fleet.installed(RELEASE, version2, self.n, timeout=120 + self.n / 20)
        after, origin1 = await self.fleet.stats(), self.fleet.origin_served()
        records2 = await self.fleet.collect(RELEASE, version2)
        push_update_bytes = (device_bytes(before, after) + origin1[1] - origin0[1]) / self.n
        out["one_file_bytes_ratio"] = ratio(push_update_bytes, v2_file)
        base["one_file_bytes_ratio"] = {"changed_file_bytes": v2_file, "bytes_per_agent": round(push_update_bytes)}
        details["v2_one_file"] = {
            "notify_s": percentiles([h - t_apply2 for h, _, _ in records2]),
            "install_s": percentiles([i - t_apply2 for _, _, i in records2 if i]),
            "bytes_per_agent": round(push_update_bytes),
        }

        # 5. push-the-whole-bundle baseline: the same update, every blob moved
        await self.fleet.launch(group="full", count=self.full_n, full_pull=True)
        await self.fleet.wait("full group connect", lambda s: s["connected"] >= self.n + self.full_n, timeout=120)
        _, fv1 = await self.fleet.publish(FULL_RELEASE, v1, "full")
        await self.fleet.installed(FULL_RELEASE, fv1, self.full_n, timeout=120)
        before, origin0 = await self.fleet.stats(), self.fleet.origin_served()
        _, fv2 = await self.fleet.publish(FULL_RELEASE, v2, "full")
        await self.fleet.installed(FULL_RELEASE, fv2, self.full_n, timeout=120)
        after, origin1 = await self.fleet.stats(), self.fleet.origin_served()
        full_update_bytes = (device_bytes(before, after) + origin1[1] - origin0[1]) / self.full_n
        out["push_full_bytes_ratio"] = ratio(push_update_bytes, full_update_bytes)
        base["push_full_bytes_ratio"] = {
            "push_whole_bundle_bytes_per_agent": round(full_update_bytes),
            "push_then_pull_bytes_per_agent": round(push_update_bytes),
            "agents": self.full_n,
        }
        details["first_install_bytes_ratio"] = ratio(
            details["v1"]["bytes_per_agent"] + details["v1"]["origin_bytes_per_agent"], full_update_bytes
        )
        status = await self.fleet.status()
        details["http"] = {"blobs_fetched": status["http_fetched"], "url_failures": status["http_failures"]}
        await self.fleet.all({"cmd": "stop"})

        # 6. polling baseline
        poll = await self._polling(v1, push_idle)
        if poll is not None:
            base["notify_s"] = poll["heard_s"]
            base["install_s"] = poll["install_s"]
            out["polling_install_ratio"] = ratio(out["install_s"]["p50"], poll["install_s"]["p50"])
            out["polling_idle_load_ratio"] = ratio(
                push_idle["messages_per_s_per_agent"], poll["idle"]["messages_per_s_per_agent"]
            )
            base["polling_install_ratio"] = {
                "push_install_p50_s": out["install_s"]["p50"],
                "polling_install_p50_s": poll["install_s"]["p50"],
                "polling_agents": self.poll_n,
                "poll_interval_s": self.poll_s,
                "p90_ratio": ratio(out["install_s"]["p90"], poll["install_s"]["p90"]),
                "p100_ratio": ratio(out["install_s"]["p100"], poll["install_s"]["p100"]),
                # The polling fleet's own pulls (spread over the interval, so uncongested) at the push fleet's size.
                "modelled_polling_install_s_at_fleet_size": modelled_polling_install(
                    interval_s=self.poll_s, pull_s=poll["pull_s"], n=self.n
                ),
            }
            base["polling_idle_load_ratio"] = {
                "push": push_idle,
                "polling": poll["idle"],
                "server_cpu_ratio_per_agent": ratio(
                    push_idle["server_cpu_per_s"] / self.n, poll["idle"]["server_cpu_per_s"] / max(1, self.poll_n)
                ),
            }
        out["baselines"] = base
        out["details"] = details
        out["goals"] = {
            "connected_agents_ge_20000": out["max_connected_agents"] >= 20_000,
            "notified_10000_within_2s": self.n >= 10_000 and out["notify_s"]["p100"] <= 2.0,
            "polling_install_ratio_le_0.1": out.get("polling_install_ratio", float("inf")) <= 0.1,
            "one_file_bytes_ratio_le_1.1": out["one_file_bytes_ratio"] <= 1.1,
        }
        out["method"] = {
            "measured": [
                "max_connected_agents",
                "server_rss_bytes_per_agent",
                "notify_s",
                "install_s",
                "one_file_bytes_ratio",
                "push_full_bytes_ratio",
                "controller_cpu_s_per_install",
                "controller_bytes_per_install",
                "polling_install_ratio (polling fleet of baselines.polling_install_ratio.polling_agents)",
                "polling_idle_load_ratio (per agent)",
            ],
            "modelled": ["baselines.polling_install_ratio.modelled_polling_install_s_at_fleet_size"],
            "bytes": "serialized protobuf bytes of device RPCs, both directions, counted by the controller "
            "(HTTP/2 framing and TLS excluded), plus the body bytes the blob origin sent (its access log) "
            "in the byte ratios; controller_bytes_per_install counts the controller's alone",
            "times": "wall clock from the ApplyRelease call to each agent's receipt / verified install; "
            "one machine, one clock",
        }
        out["environment"] = {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        }
        return out

    async def _polling(self, v1: tuple[pathlib.Path, Any], push_idle: Mapping[str, float]) -> dict[str, Any] | None:
        if self.poll_n <= 0:
            return None
        await self.fleet.launch(group="poll", count=self.poll_n, mode="poll")
        # Every poller makes its first call within one interval (uniform phase); then steady state.
        await asyncio.sleep(self.poll_s + 1)
        a = await self.fleet.stats()
        await asyncio.sleep(self.idle_s)
        b = await self.fleet.stats()
        idle = {
            "messages_per_s_per_agent": device_messages(a, b) / self.idle_s / self.poll_n,
            "server_cpu_per_s": (b.cpu_seconds - a.cpu_seconds) / self.idle_s,
        }
        t_apply, version = await self.fleet.publish(POLL_RELEASE, v1, "poll")
        await self.fleet.installed(POLL_RELEASE, version, self.poll_n, timeout=self.poll_s * 3 + 60)
        records = await self.fleet.collect(POLL_RELEASE, version)
        await self.fleet.all({"cmd": "stop"})
        return {
            "idle": idle,
            "heard_s": percentiles([h - t_apply for h, _, _ in records]),
            "pull_s": [i - h for h, _, i in records if i],
            "install_s": percentiles([i - t_apply for _, _, i in records if i]),
        }


def run_fleet_bench(*, observability: str = "off", blobs: str = "grpc", **kwargs: Any) -> dict[str, Any]:
    """One run; `blobs="both"`: the two delivery modes one after the other, each on its own stack, compared."""
    if blobs != "both":
        return asyncio.run(_run(observability, {**kwargs, "blobs": blobs}))
    workdir = pathlib.Path(kwargs.pop("workdir"))
    server_url = kwargs.pop("database_url", None)
    results = {}
    for mode in BLOB_MODES:
        log.info("--blobs both: the %s run", mode)
        (workdir / mode).mkdir(parents=True, exist_ok=True)
        # Each run starts from an empty database, as a single run does: on the server named, one of its own.
        with _scratch_database(server_url) as database_url:
            run_kwargs = {**kwargs, "blobs": mode, "workdir": workdir / mode, "database_url": database_url}
            results[mode] = asyncio.run(_run(observability, run_kwargs))
    return compare_modes(results)


async def _run(observability: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """One run; or, with observability, the run with metrics and traces on, and (both) off then on."""
    from tether.devtools import bench_observability as obs

    if observability == "off":
        return await FleetBench(**kwargs).run()

    async def one(controller_args: tuple[str, ...], tag: str) -> dict[str, Any]:
        workdir = pathlib.Path(kwargs["workdir"]) / tag
        workdir.mkdir(parents=True, exist_ok=True)
        return await FleetBench(**{**kwargs, "workdir": workdir}, controller_args=controller_args).run()

    if observability == "on":
        result, observed = await obs.measured_on(one)
        result["observability"] = {"mode": "on", **observed}
        return result
    off = await one((), "off")
    on, observed = await obs.measured_on(one)
    measured = obs.compare(off, on, observed)
    for key in ("observability_install_ratio", "observability_cpu_ratio"):
        off[key] = measured[key]
        off["baselines"][key] = measured["baseline"]
    off["goals"]["observability_install_ratio_ge_0.95"] = (measured["observability_install_ratio"] or 0) >= 0.95
    off["goals"]["observability_cpu_ratio_le_1.05"] = (measured["observability_cpu_ratio"] or 9) <= 1.05
    off["method"]["measured"].append(
        "observability_install_ratio and observability_cpu_ratio (a second run in this invocation: /metrics "
        "scraped every second, every span exported over OTLP to a loopback receiver; v1 rollout, on / off)"
    )
    return off


@contextlib.contextmanager
def _scratch_database(server_url: str | None) -> Iterator[str | None]:
    """A new, empty database on the PostgreSQL server of `server_url`, dropped afterwards (None: embedded)."""
    if not server_url:
        yield None
        return
    import psycopg
    from psycopg import conninfo, sql

    name = f"tether_bench_{secrets.token_hex(6)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield conninfo.make_conninfo(server_url, dbname=name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@click.command("fleet")
@click.option("--agents", type=click.IntRange(1, 100_000), default=2000, show_default=True, help="Push agents.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default="fleet-bench.json", show_default=True)
@click.option(
    "--processes", type=click.IntRange(1, 64), default=2, show_default=True, help="Simulator worker processes."
)
@click.option(
    "--share",
    type=click.IntRange(1, 100),
    default=1,
    show_default=True,
    help="Agents per TCP connection (1: one connection each; more: HTTP/2-multiplexed, as behind an L7 proxy).",
)
@click.option("--poll-agents", type=int, default=1000, show_default=True, help="Polling-baseline fleet (0: skip).")
@click.option("--poll-interval", type=float, default=30.0, show_default=True, help="Polling baseline interval (s).")
@click.option("--full-agents", type=int, default=100, show_default=True, help="Push-whole-bundle baseline agents.")
@click.option("--idle", "idle_s", type=float, default=30.0, show_default=True, help="Idle window, seconds.")
@click.option("--model-kib", type=click.IntRange(1, 65536), default=64, show_default=True, help="Size of model.bin.")
@click.option("--ramp", "ramp_s", type=float, default=None, help="Seconds over which agents connect (default N/1500).")
@click.option(
    "--database-url",
    envvar="TETHER_DATABASE_URL",
    default=None,
    help="Existing PostgreSQL (else embedded); with --blobs both, each run gets a new database on that server.",
)
@click.option("--broker-url", envvar="TETHER_BROKER_URL", default=None, help="Existing Redis (else embedded).")
@click.option("--tls", is_flag=True, help="Serve TLS with a CA made for the run (default: plaintext).")
@click.option("--connect-only", is_flag=True, help="Stop after the connect phase (connections and memory only).")
@click.option("--keep", is_flag=True, help="Keep the working directory (controller log, bundles).")
@click.option(
    "--pull-rate",
    type=click.FloatRange(min=0),
    default=None,
    help="The controller's --pull-rate (installs/s a push plans for; 0: no spreading). Default: its default.",
)
@click.option(
    "--observability",
    type=click.Choice(["off", "on", "both"]),
    default="off",
    show_default=True,
    help="The controller's /metrics (scraped every second) and OpenTelemetry traces (exported over OTLP): off, "
    "on, or both in one invocation (adds observability_install_ratio and observability_cpu_ratio, on / off).",
)
@click.option(
    "--blobs",
    type=click.Choice([*BLOB_MODES, "both"]),
    default="grpc",
    show_default=True,
    help="Where agents pull blobs: grpc (the controller), http (an nginx origin, signed URLs), or both runs "
    "compared (adds cpu_per_install_ratio).",
)
def fleet(
    agents: int,
    out_path: str,
    processes: int,
    share: int,
    poll_agents: int,
    poll_interval: float,
    full_agents: int,
    idle_s: float,
    model_kib: int,
    ramp_s: float | None,
    database_url: str | None,
    broker_url: str | None,
    tls: bool,
    connect_only: bool,
    keep: bool,
    pull_rate: float | None,
    observability: str,
    blobs: str,
) -> None:
    """Measure push-then-pull at fleet scale against polling and push-the-whole-bundle; write JSON."""
    if connect_only and observability != "off":
        raise click.UsageError("--observability measures a rollout: it cannot go with --connect-only")
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="tether-fleet-bench-"))
    try:
        result = run_fleet_bench(
            agents=agents,
            processes=processes,
            share=share,
            poll_agents=poll_agents,
            poll_interval=poll_interval,
            full_agents=full_agents,
            idle_s=idle_s,
            model_kib=model_kib,
            database_url=database_url,
            broker_url=broker_url,
            workdir=workdir,
            ramp_s=ramp_s,
            tls=tls,
            connect_only=connect_only,
            pull_rate=pull_rate,
            observability=observability,
            blobs=blobs,
        )
    finally:
        if keep:
            click.echo(f"working directory kept: {workdir}", err=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    pathlib.Path(out_path).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    if blobs == "both":
        summary: dict[str, Any] = {mode: _summary(result[mode]) for mode in BLOB_MODES}
        summary["cpu_per_install_ratio"] = result["cpu_per_install_ratio"]
    else:
        summary = _summary(result)
    click.echo(json.dumps(summary, indent=1))
    click.echo(f"wrote {out_path}")


def _summary(result: Mapping[str, Any]) -> dict[str, Any]:
    keys = (
        "blobs",
        "max_connected_agents",
        "server_rss_bytes_per_agent",
        "notify_s",
        "install_s",
        "polling_install_ratio",
        "polling_idle_load_ratio",
        "push_full_bytes_ratio",
        "one_file_bytes_ratio",
        "controller_cpu_s_per_install",
        "controller_bytes_per_install",
        "observability_install_ratio",
        "observability_cpu_ratio",
    )
    return {k: result[k] for k in keys if k in result}
