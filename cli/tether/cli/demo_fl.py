"""`tether demo --scenario fl`: examples/digits-fl learned by a simulated fleet, live.

The machinery of `tether bench fl`'s end-to-end path (`tether.devtools.bench_fl_e2e`)
at demo size: an embedded PostgreSQL, the broker, the controller process with
its round driver and a Celery worker process; N real agents, each with its own
shard of the Dirichlet split of scikit-learn's digits; the digits-fl bundle
uploaded and its federated release applied through the admin API (what the
operator sends for `spec.federated`). The controller then runs the rounds by
itself. The demo shows each round as it happens (who was selected, updates
coming in) and, once its model is published, exports it (as `tether fl
export` does) and scores it on the held-out set, so the accuracy climbs on
screen. It ends with the round history as `tether fl history` prints it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from tether.devtools import stack as stack_mod


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    agents: int = 20
    per_round: int = 5
    rounds: int = 10


async def run_fl_demo(config: stack_mod.StackConfig, *, plan: Plan, console: Console, timeout: float) -> dict[str, Any]:
    from tether.devtools import bench_fl_e2e, bench_fl_sim, fldata

    t0 = time.monotonic()
    console.rule("[bold]Tether demo: federated learning")
    example = bench_fl_sim.example_dir()
    with console.status("the digits split and the training code"):
        split = fldata.digits_split(devices=plan.agents, seed=0)
        fltrain = bench_fl_sim.load_fltrain(example)
    console.print(
        f"[green]✓[/] scikit-learn digits: {len(split.y_test)} held out for the cloud, the rest over "
        f"{plan.agents} devices by Dirichlet({fldata.ALPHA}) labels ({min(split.counts())}-"
        f"{max(split.counts())} samples each)"
    )
    fed = bench_fl_e2e.Config(per_round=plan.per_round, rounds=plan.rounds, round_timeout_s=timeout)
    run = bench_fl_e2e.FederatedRun(fed, split=split, example=example, stack=config)
    try:
        with console.status("PostgreSQL, broker, controller, Celery worker, the fleet; bundle and release"):
            await run.start(say=lambda text: console.print(f"[green]✓[/] {text}"))
        return await _rounds(run, fltrain=fltrain, split=split, plan=plan, console=console, t0=t0)
    finally:
        with console.status("stopping everything the demo started"):
            await run.stop()
        if config.keep_workdir:
            console.print(f"logs and state kept in {run.stack.workdir}")


async def _rounds(run: Any, *, fltrain: Any, split: Any, plan: Plan, console: Console, t0: float) -> dict[str, Any]:
    import asyncio

    from tether.devtools import bench_fl_e2e

    def score(weights: dict[str, Any]) -> float:
        return float(fltrain.evaluate(weights, split.X_test, split.y_test)["accuracy"])

    accuracy = [await asyncio.to_thread(score, await run.model(0))]
    console.print(f"  round 0 (the bundle's model): held-out accuracy {accuracy[0]:.3f}")
    rounds: list[dict[str, Any]] = []
    ok = True
    for number in range(1, plan.rounds + 1):
        shown = False
        with console.status(f"round {number}/{plan.rounds}: waiting for the driver to open it") as live:
            while True:
                record = await run.current()
                if record is not None and record.number == number and record.selected and not shown:
                    how = " (told by push; each pulls the round's model, one blob)" if number == 1 else ""
                    console.print(f"  round {number}/{plan.rounds}: selected {' '.join(sorted(record.selected))}{how}")
                    shown = True
                if record is not None and record.number == number:
                    live.update(f"round {number}/{plan.rounds}: {len(record.received)}/{len(record.selected)} updates")
                    if record.served is not None or record.phase == "Failed":
                        break
                if record is not None and record.number > number:
                    break
                await asyncio.sleep(0.1)
        try:
            record = await run.published(number)
        except bench_fl_e2e.RunFailed as e:
            console.print(f"[red]round {number}: {e}[/]")
            ok = False
            break
        accuracy.append(await asyncio.to_thread(score, await run.model(number)))
        rounds.append(
            {
                "round": number,
                "participants": sorted(record.selected),
                "updates": len(record.received),
                "refused": record.refused,
                "accuracy": accuracy[-1],
                "round_s": record.wall_s,
                "version": record.version,
            }
        )
        console.print(
            f"  round {number}/{plan.rounds}: {len(record.received)}/{len(record.selected)} updates folded -> "
            f"version {record.version}, accuracy [bold]{accuracy[-1]:.3f}[/] ({accuracy[-1] - accuracy[-2]:+.3f}) "
            f"[dim]{record.wall_s:.2f}s[/]"
        )
    status = await run.status()
    _history(console, status.federated, accuracy, rounds)
    elapsed = time.monotonic() - t0
    ok = ok and len(rounds) == plan.rounds and accuracy[-1] > accuracy[0]
    verdict = "[green]demo finished[/]" if ok else "[red]demo did not complete[/]"
    console.print(f"{verdict} in {elapsed:.1f}s")
    return {
        "ok": ok,
        "scenario": "fl",
        "release": run.task,
        "elapsed_s": round(elapsed, 2),
        "devices": plan.agents,
        "per_round": plan.per_round,
        "rounds": rounds,
        "accuracy": accuracy,
        "federated": status.federated,
        "tls": run.stack.ca_file is not None,
        "signed": run.stack.signing_key is not None,
    }


def _history(console: Console, doc: Any, accuracy: list[float], rounds: list[dict[str, Any]]) -> None:
    """The controller's round history (`tether fl history`'s rows, the devices' own metrics sample-weighted) with
    the held-out accuracy of each round's model and the round's time."""
    seconds = {r["round"]: r["round_s"] for r in rounds}
    table = Table(title="round history (tether fl history default/digits-fl)", title_justify="left")
    for column in ("round", "phase", "updates", "samples", "device loss", "device acc", "held-out acc", "s"):
        table.add_column(column, justify="left" if column == "phase" else "right", no_wrap=column == "phase")
    for h in (doc or {}).get("history") or []:
        number, metrics = int(h["round"]), h.get("metrics") or {}
        table.add_row(
            str(number),
            str(h.get("phase", "")),
            f"{h.get('updates', '')}/{h.get('participants', '')}",
            str(h.get("samples", "")),
            f"{metrics['loss']:.3f}" if "loss" in metrics else "",
            f"{metrics['accuracy']:.3f}" if "accuracy" in metrics else "",
            f"{accuracy[number]:.3f}" if number < len(accuracy) else "",
            f"{seconds[number]:.2f}" if seconds.get(number) is not None else "",
        )
    console.print(table)
