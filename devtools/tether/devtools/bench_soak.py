"""`tether bench soak`: a simulated fleet under churn for a while, through a staged rollout and a rollback.

What runs: the fleet benchmark's stack (`simfleet.SimulatedFleet`: embedded
PostgreSQL and redis-server or the services named, one `tether controller`
process, `--processes` simulator processes holding `--agents`
`simagent.SimAgent`s, each on its own TCP connection). Then, in order:

1. connect, and version 1 to the whole fleet with no churn: the baseline
   (`baseline_install_s`, and the controller's RSS once settled);
2. churn starts: every `--churn-every` seconds a seeded `--churn` share of
   the agents drop their connection as a killed app does, stay down 1-3 s
   and come back with what they kept (credential, installs, blobs);
   `--controller-kills N` also SIGKILLs the controller N times, evenly over
   the run, restarting it on the same port at once;
3. version 2 in three stages (10 %, 50 %, 100 %), each promoted once every
   device of the stage holds it and the controller counts it installed
   (`stages[].converge_s`) and it baked `--bake` seconds (default a fifth of
   `--duration`, so churn and kills meet every stage), then a rollback to
   version 1 (`rollback.converge_s`);
4. churn goes on until `--duration` seconds have passed since it started;
   then it stops and the fleet settles.

Checked device by device at the end: every agent holds what the policy says
(version 1 after the rollback: `wrong_version`) and the controller's delivery
row for it says the same (`lost_reports`: the agent holds it, the controller
does not know). Reported: errors by RPC and status code, restarts, controller
RSS over the run (`controller_rss`: samples, growth since the baseline and
since the last controller restart after 15 s of warm-up, `rss_growth_ratio` =
last / baseline) and
the time to converge under churn against the baseline install
(`churn_converge_ratio`: slowest stage / baseline).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pathlib
import random
import shutil
import tempfile
import time
from typing import Any

import click

from tether.devtools import simfleet

log = logging.getLogger(__name__)

RELEASE = "bench/soak"
GROUP = "soak"
STAGES = ({"percent": 10}, {"percent": 50}, {"percent": 100})


class SoakBench:
    def __init__(
        self,
        fleet: simfleet.SimulatedFleet,
        *,
        agents: int,
        duration_s: float,
        churn: float,
        churn_every_s: float,
        controller_kills: int,
        seed: int,
        settle_timeout_s: float,
        bake_s: float | None = None,
    ) -> None:
        self.fleet = fleet
        # By default the stages and the rollback spread over the run: churn and kills meet each of them.
        self.bake_s = duration_s / 5 if bake_s is None else bake_s
        self.n = agents
        self.duration_s = duration_s
        self.churn = churn
        self.churn_every_s = churn_every_s
        self.controller_kills = controller_kills
        self.rng = random.Random(seed)
        self.settle_timeout_s = settle_timeout_s
        self.samples: list[dict[str, Any]] = []
        self.restarts = 0
        self.churn_rounds = 0
        self.kills_done = 0
        self.last_restart_at = 0.0
        self._t0 = time.monotonic()
        self._churn_started = self._t0

    # ------------------------------------------------------------ helpers
    def _now(self) -> float:
        return round(time.monotonic() - self._t0, 1)

    async def _sample(self) -> None:
        with contextlib.suppress(Exception):  # the controller may be restarting
            stats = await self.fleet.stats()
            self.samples.append(
                {"t": self._now(), "rss_bytes": int(stats.rss_bytes), "restarted_at": self.last_restart_at}
            )

    async def _holdings(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for reply in await self.fleet.all({"cmd": "holdings", "release": RELEASE}, timeout=120):
            out.update(reply["holdings"])
        return out

    async def _apply(self, digest: str, rollout: dict[str, Any] | None) -> int:
        applied = await self.fleet.admin.apply_release(
            release=RELEASE, manifest_digest=digest, target={"matchLabels": {"group": GROUP}}, rollout=rollout
        )
        return int(applied.version)

    async def _until(self, what: str, check: Any, *, timeout: float) -> tuple[bool, float]:
        started = time.monotonic()
        while True:
            with contextlib.suppress(Exception):
                if await check():
                    return True, round(time.monotonic() - started, 2)
            if time.monotonic() - started > timeout:
                log.warning("%s: not within %.0f s", what, timeout)
                return False, round(time.monotonic() - started, 2)
            await asyncio.sleep(0.5)

    # ------------------------------------------------------------ background faults
    async def _churn_forever(self) -> None:
        while True:
            await asyncio.sleep(self.churn_every_s)
            replies = await self.fleet.all(
                {"cmd": "churn", "fraction": self.churn, "seed": self.rng.randrange(1 << 30)}, timeout=120
            )
            self.restarts += sum(int(r["restarted"]) for r in replies)
            self.churn_rounds += 1

    async def _kill_controller_at(self, moments: list[float]) -> None:
        stack = self.fleet.stack
        port = int(stack.controller_address.rsplit(":", 1)[1])
        for at in moments:
            await asyncio.sleep(max(0.0, at - (time.monotonic() - self._churn_started)))
            log.warning("SIGKILL the controller (%d/%d)", self.kills_done + 1, len(moments))
            stack.components["controller"].kill()
            await stack.start_controller(port=port)
            self.kills_done += 1
            self.last_restart_at = self._now()

    async def _sample_forever(self) -> None:
        while True:
            await self._sample()
            await asyncio.sleep(5)

    # ------------------------------------------------------------ the run
    async def run(self) -> dict[str, Any]:
        out: dict[str, Any] = {"agents": self.n, "duration_s": self.duration_s, "churn": self.churn}
        out["churn_every_s"] = self.churn_every_s
        fleet = self.fleet
        await fleet.launch(group=GROUP, count=self.n, ramp_s=self.n / 500)
        await fleet.wait("connect", lambda s: s["connected"] >= self.n, timeout=max(120, self.n / 20))

        # 1. baseline: version 1 everywhere, no churn
        v1_bundle = fleet.bundle("v1", model=os.urandom(64 * 1024))
        await fleet.admin.upload_bundle(*v1_bundle)
        started = time.monotonic()
        v1 = await self._apply(v1_bundle[1].digest, None)
        await fleet.installed(RELEASE, v1, self.n, timeout=max(120, self.n / 10))
        out["baseline_install_s"] = round(time.monotonic() - started, 2)
        await asyncio.sleep(2)
        await self._sample()
        baseline_rss = self.samples[-1]["rss_bytes"] if self.samples else 0

        # 2. churn (and controller kills) in the background
        self._churn_started = time.monotonic()
        background = [asyncio.create_task(self._churn_forever()), asyncio.create_task(self._sample_forever())]
        if self.controller_kills:
            step = self.duration_s / (self.controller_kills + 1)
            moments = [step * (i + 1) for i in range(self.controller_kills)]
            background.append(asyncio.create_task(self._kill_controller_at(moments)))
        try:
            # 3. version 2 in three stages, then a rollback to version 1
            v2_bundle = fleet.bundle("v2", model=os.urandom(64 * 1024))
            await fleet.admin.upload_bundle(*v2_bundle)
            doc: dict[str, Any] = {"version": 0, "salt": RELEASE, "stage": 0, "action": "progress"}
            doc["stages"] = list(STAGES)
            v2 = await self._apply(v2_bundle[1].digest, doc)
            stages = []
            for j in range(len(STAGES)):
                doc = {**doc, "version": v2, "stage": j}
                await self._apply(v2_bundle[1].digest, doc)

                async def stage_done(j: int = j) -> bool:
                    status = await fleet.admin.get_release_status(RELEASE)
                    health = (status.health or {}).get("stages") or []
                    if len(health) <= j or (status.health or {}).get("stage") != j:
                        return False
                    eligible, installed = int(health[j]["eligible"]), int(health[j]["installed"])
                    held = sum(1 for v in (await self._holdings()).values() if v == v2)
                    return eligible > 0 and installed >= eligible and held >= eligible

                ok, took = await self._until(f"stage {j}", stage_done, timeout=self.settle_timeout_s)
                stages.append({"stage": j, "percent": STAGES[j]["percent"], "converged": ok, "converge_s": took})
                await asyncio.sleep(self.bake_s)  # the stage bakes under churn before the next one
            out["stages"] = stages
            await self._apply(v2_bundle[1].digest, {**doc, "action": "rollback"})

            async def rolled_back() -> bool:
                return all(v == v1 for v in (await self._holdings()).values())

            ok, took = await self._until("rollback", rolled_back, timeout=self.settle_timeout_s)
            out["rollback"] = {"converged": ok, "converge_s": took}

            # 4. churn on until the duration is over
            left = self.duration_s - (time.monotonic() - self._churn_started)
            if left > 0:
                await asyncio.sleep(left)
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
        out["churned_s"] = round(time.monotonic() - self._churn_started, 1)
        out["churn_rounds"], out["agent_restarts"], out["controller_kills"] = (
            self.churn_rounds,
            self.restarts,
            self.kills_done,
        )

        # Settle, then check device by device
        async def settled() -> bool:
            status = await fleet.status()
            return status["connected"] >= self.n and all(v == v1 for v in (await self._holdings()).values())

        ok, took = await self._until("settle", settled, timeout=self.settle_timeout_s)
        out["settle"] = {"converged": ok, "converge_s": took}
        await asyncio.sleep(2)  # the last reports of the last reconnections
        holdings = await self._holdings()
        controller_view = {
            d.device_id: next(((v, s) for r, v, s in d.releases if r == RELEASE), (0, ""))
            for d in await fleet.admin.list_devices(page_size=1000)
        }
        wrong = sorted(d for d, v in holdings.items() if v != v1)
        lost = sorted(
            d
            for d, v in holdings.items()
            if v and (controller_view.get(d, (0, ""))[0] != v or controller_view[d][1] not in ("installed",))
        )
        out["wrong_version"] = {"count": len(wrong), "devices": wrong[:20]}
        out["lost_reports"] = {
            "count": len(lost),
            "devices": lost[:20],
            "seen": {d: controller_view.get(d) for d in lost[:5]},
        }
        status = await fleet.status()
        out["errors"] = {
            "total": status["errors"],
            "by_code": status.get("error_codes", {}),
            "crashed": status["crashed"],
        }
        await self._sample()
        last = self.samples[-1]["rss_bytes"] if self.samples else 0
        # After a restart the controller warms up (connections, caches) for a few seconds: not growth.
        since_restart = [
            s for s in self.samples if s["restarted_at"] == self.last_restart_at and s["t"] >= self.last_restart_at + 15
        ]
        out["controller_rss"] = {
            "baseline_bytes": baseline_rss,
            "last_bytes": last,
            "growth_bytes": last - baseline_rss,
            "growth_since_last_restart_bytes": (since_restart[-1]["rss_bytes"] - since_restart[0]["rss_bytes"])
            if since_restart
            else 0,
            "samples": self.samples,
        }
        out["rss_growth_ratio"] = round(last / baseline_rss, 3) if baseline_rss else None
        slowest = max([s["converge_s"] for s in out["stages"]] + [out["rollback"]["converge_s"]])
        out["churn_converge_ratio"] = round(slowest / max(out["baseline_install_s"], 0.01), 2)
        return out


async def run_soak(
    *,
    agents: int,
    duration_s: float,
    churn: float,
    churn_every_s: float,
    processes: int,
    controller_kills: int,
    seed: int,
    settle_timeout_s: float,
    database_url: str | None,
    broker_url: str | None,
    workdir: pathlib.Path,
    bake_s: float | None = None,
) -> dict[str, Any]:
    fleet = simfleet.SimulatedFleet(
        processes=processes,
        share=1,
        poll_s=30.0,
        workdir=workdir,
        database_url=database_url,
        broker_url=broker_url,
    )
    await fleet.start()
    try:
        bench = SoakBench(
            fleet,
            agents=agents,
            duration_s=duration_s,
            churn=churn,
            churn_every_s=churn_every_s,
            controller_kills=controller_kills,
            seed=seed,
            settle_timeout_s=settle_timeout_s,
            bake_s=bake_s,
        )
        return await bench.run()
    finally:
        await fleet.stop()


@click.command("soak")
@click.option("--agents", type=click.IntRange(1, 100_000), default=1000, show_default=True, help="Simulated agents.")
@click.option(
    "--duration",
    "duration_s",
    type=click.FloatRange(min=1),
    default=1800,
    show_default=True,
    help="Seconds of churn (the rollout runs inside it).",
)
@click.option(
    "--churn",
    type=click.FloatRange(0, 1),
    default=0.3,
    show_default=True,
    help="Share of the agents restarted at each churn round.",
)
@click.option(
    "--churn-every",
    "churn_every_s",
    type=click.FloatRange(min=0.5),
    default=5.0,
    show_default=True,
    help="Seconds between churn rounds.",
)
@click.option(
    "--controller-kills",
    type=click.IntRange(0, 1000),
    default=0,
    show_default=True,
    help="SIGKILLs of the controller, evenly over the run (restarted at once on the same port).",
)
@click.option("--processes", type=click.IntRange(1, 64), default=2, show_default=True, help="Simulator processes.")
@click.option("--seed", type=int, default=14, show_default=True, help="Seed of the churn picks.")
@click.option(
    "--settle-timeout",
    "settle_timeout_s",
    type=float,
    default=300,
    show_default=True,
    help="Seconds a stage, the rollback or the final settling may take before it is reported unconverged.",
)
@click.option(
    "--bake",
    "bake_s",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds each stage holds after it converged (default: a fifth of --duration).",
)
@click.option("--database-url", envvar="TETHER_DATABASE_URL", default=None, help="Existing PostgreSQL (else embedded).")
@click.option("--broker-url", envvar="TETHER_BROKER_URL", default=None, help="Existing Redis (else embedded).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default="soak-bench.json", show_default=True)
@click.option("--keep", is_flag=True, help="Keep the working directory (controller log).")
def soak(
    agents: int,
    duration_s: float,
    churn: float,
    churn_every_s: float,
    controller_kills: int,
    processes: int,
    seed: int,
    settle_timeout_s: float,
    bake_s: float | None,
    database_url: str | None,
    broker_url: str | None,
    out_path: str,
    keep: bool,
) -> None:
    """Churn a simulated fleet through a staged rollout and a rollback; check every device; write JSON."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="tether-soak-"))
    try:
        result = asyncio.run(
            run_soak(
                agents=agents,
                duration_s=duration_s,
                churn=churn,
                churn_every_s=churn_every_s,
                processes=processes,
                controller_kills=controller_kills,
                seed=seed,
                settle_timeout_s=settle_timeout_s,
                bake_s=bake_s,
                database_url=database_url,
                broker_url=broker_url,
                workdir=workdir,
            )
        )
    finally:
        if keep:
            click.echo(f"working directory kept: {workdir}", err=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    pathlib.Path(out_path).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    summary = {k: v for k, v in result.items() if k != "controller_rss"}
    summary["controller_rss"] = {k: v for k, v in result["controller_rss"].items() if k != "samples"}
    click.echo(json.dumps(summary, indent=1))
    click.echo(f"wrote {out_path}")
