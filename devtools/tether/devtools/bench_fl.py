"""`tether bench fl`: federated learning on examples/digits-fl, side by side with Flower, and at scale.

One run, JSON out (progress lines on stderr), four figures:

1. Side by side with Flower (`flwr[simulation]` 1.42, its own Ray simulation
   engine, run as a child process by `--flower-python`, see
   `tether.devtools.bench_fl_flower`): the same split, model, training
   function and hyper-parameters (FedAvg, 10 of 100 devices a round, one local
   epoch of SGD, lr 0.1, batch 32, 30 rounds) and the same participants each
   round (Tether's seeded sampler draws them; both systems get the list).
   Held-out accuracy after every round for both, the largest per-round gap,
   and median round times with their ratio. Tether's side runs on the paths
   of `--tether-path` (`both` by default, `in-process` with `--quick`), each
   named in the JSON (`tether_path`, `tether_paths`): "in-process strategies"
   (the training function and Tether's pure strategies in one process,
   `bench_fl_sim.InProcessPath`) and the end-to-end path (the controller and
   its round driver, a Celery worker, PostgreSQL, real agents:
   `bench_fl_e2e.EndToEndPath`), whose figures are the headline ones.
2. Best strategy: rounds to reach 0.90 held-out accuracy for every strategy
   over a small documented grid of server parameters (`GRID`), at most
   `--max-rounds` rounds.
3. Aggregation at scale: `--agg-updates` updates x `--agg-params` float32
   parameters folded by Tether's streaming fold vs NumPy on the same arrays,
   each in a fresh process: throughput ratio and peak memory over one update
   (`tether.devtools.bench_fl_agg`).
4. Robustness: 10 % of the devices send poisoned updates (x -100): final
   accuracy of FedAvg, median, trimmed mean, Krum and Multi-Krum, clean and
   poisoned.

    tether bench fl --flower-python /path/to/venv/bin/python --out bench-fl.json
    tether bench fl --quick --no-flower            # seconds: the test's size
    tether bench fl --quick --tether-path both --sections flower --no-flower   # 6 agents end to end
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import click
import numpy as np

from tether.devtools import bench_fl_agg, bench_fl_e2e, bench_fl_sim, fldata
from tether.spec import strategies

TARGET = 0.90
FLOWER_INSTALL = (
    "python -m venv --system-site-packages /tmp/flwr-venv && /tmp/flwr-venv/bin/pip install 'flwr[simulation]==1.42.0'"
    "  (its own environment: flwr pins protobuf < 7, which Tether's stubs cannot use), then pass "
    "--flower-python /tmp/flwr-venv/bin/python"
)

# The strategies' server parameters tried for the rounds-to-0.90 figure (client side fixed: lr 0.1, batch 32,
# one epoch). FedAvgM: server learning rate 1-5 with momentum 0.9 (Hsu et al. 2019 use 0.9 and tune the rate);
# FedAdam / FedYogi / FedAdagrad: beta1 0.9, beta2 0.99, tau 1e-3 (Reddi et al. 2021's defaults), the server
# learning rate eta searched over 0.01-0.3 as in their grid; FedProx: mu 0.01 (its gain is on heterogeneous
# local work, not speed).
GRID: list[tuple[str, strategies.Strategy]] = [
    ("fedAvg", strategies.FedAvg()),
    ("fedProx", strategies.FedProx(proximal_mu=0.01)),
    *[("fedAvgM", strategies.FedAvgM(server_learning_rate=lr, momentum=0.9)) for lr in (1.0, 2.0, 3.0, 5.0)],
    *[
        (name, strategies.FedOpt(optimizer=opt, server_learning_rate=eta))
        for name, opt in (
            ("fedAdam", strategies.ServerOptimizer.ADAM),
            ("fedYogi", strategies.ServerOptimizer.YOGI),
            ("fedAdagrad", strategies.ServerOptimizer.ADAGRAD),
        )
        for eta in (0.01, 0.03, 0.1, 0.3)
    ],
]
QUICK_GRID: list[tuple[str, strategies.Strategy]] = [
    ("fedAvg", strategies.FedAvg()),
    ("fedAvgM", strategies.FedAvgM(server_learning_rate=3.0, momentum=0.9)),
    ("fedYogi", strategies.FedOpt(optimizer=strategies.ServerOptimizer.YOGI, server_learning_rate=0.1)),
]
# Robust strategies against 10 % attackers: a round of 10 draws ~1 attacker on average, up to 3 in this schedule.
# Trimmed mean drops 3 a side (trimFraction 0.3); Krum assumes f = 2; Multi-Krum f = 3 (the most n = 10 allows,
# n >= 2f + 3) and averages the 5 best-scored updates.
ROBUST: list[tuple[str, strategies.Strategy]] = [
    ("fedAvg", strategies.FedAvg()),
    ("median", strategies.Median()),
    ("trimmedMean", strategies.TrimmedMean(trim_fraction=0.3)),
    ("krum", strategies.Krum(byzantine=2, selected=1)),
    ("multiKrum", strategies.Krum(byzantine=3, selected=5)),
]
POISONED_FRACTION = 0.1


def _say(message: str) -> None:
    click.echo(f"fl: {message}", err=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bench:
    """What every section shares: the data, the training function, the schedule and the Tether path."""

    setup: bench_fl_sim.Setup
    split: fldata.Split
    example: pathlib.Path
    fltrain: Any
    plan: list[tuple[str, ...]]
    path: bench_fl_sim.InProcessPath

    def evaluate(self, weights: dict[str, np.ndarray]) -> dict[str, float]:
        scores: dict[str, float] = self.fltrain.evaluate(weights, self.split.X_test, self.split.y_test)
        return scores

    def initial(self) -> dict[str, np.ndarray]:
        weights: dict[str, np.ndarray] = self.fltrain.initial_weights(0)
        return weights

    def run(
        self,
        strategy: strategies.Strategy,
        *,
        rounds: int,
        poisoned: frozenset[str] = frozenset(),
        stop_at: float | None = None,
        label: str = "",
    ) -> bench_fl_sim.Curve:
        def progress(r: int, accuracy: float) -> None:
            if label and (r % 10 == 0 or r == rounds):
                _say(f"{label}: round {r}/{rounds} accuracy {accuracy:.3f}")

        return bench_fl_sim.run_rounds(
            self.path,
            strategy=strategy,
            initial=self.initial(),
            plan=self.plan[:rounds],
            evaluate=self.evaluate,
            poisoned=poisoned,
            stop_at=stop_at,
            progress=progress,
        )


def _import_mnn_to_stderr() -> None:
    """Import MNN with file descriptor 1 pointing at stderr: its import prints a banner on stdout, where the JSON
    report goes."""
    import ctypes
    import os

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        import MNN  # noqa: F401

        ctypes.CDLL(None).fflush(None)
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def prepare(*, setup: bench_fl_sim.Setup, schedule_rounds: int, devices: int = fldata.DEVICES) -> Bench:
    _import_mnn_to_stderr()
    example = bench_fl_sim.example_dir()
    fltrain = bench_fl_sim.load_fltrain(example)
    split = fldata.digits_split(seed=setup.seed, devices=devices)
    plan = bench_fl_sim.schedule(
        [s.device for s in split.shards], rounds=schedule_rounds, per_round=setup.per_round, seed=setup.seed
    )
    path = bench_fl_sim.InProcessPath(fltrain=fltrain, split=split, setup=setup)
    return Bench(setup=setup, split=split, example=example, fltrain=fltrain, plan=plan, path=path)


def flower_side(bench: Bench, *, python: str | None, workdir: pathlib.Path, cpus: int) -> dict[str, Any]:
    """Flower's run in a child process, or {"skipped": why} when no interpreter with flwr is at hand."""
    interpreter = python or sys.executable
    probe = subprocess.run(
        [interpreter, "-c", "import flwr, ray; print(flwr.__version__)"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        return {"skipped": f"flwr[simulation] is not importable by {interpreter}; install it with: {FLOWER_INSTALL}"}
    inputs = workdir / "flower-inputs.npz"
    out = workdir / "flower.json"
    bench_fl_sim.write_inputs(
        inputs,
        split=bench.split,
        initial=bench.initial(),
        plan=bench.plan[: bench.setup.rounds],
        setup=bench.setup,
        fltrain_path=bench.example / "task" / "fltrain.py",
    )
    cmd = [interpreter, "-m", "tether.devtools.bench_fl_flower", "--inputs", str(inputs), "--out", str(out)]
    cmd += ["--cpus", str(cpus)]
    log = workdir / "flower.log"
    _say(f"flower: {' '.join(cmd)} (log: {log})")
    with log.open("w", encoding="utf-8") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        for line in proc.stderr:
            sink.write(line)
            if line.startswith("flower: ") and _last(line):
                _say(line.strip())
        code = proc.wait()
    if code != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise click.ClickException(f"the Flower run failed (exit {code}); the end of its log:\n{tail}")
    report: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    report["flwr"] = probe.stdout.strip()
    return report


def _last(line: str) -> bool:
    """True for a progress line of every 10th round or the last one."""
    try:
        done, total = line.split("round ", 1)[1].split()[0].split("/")
        return int(done) % 10 == 0 or done == total
    except (IndexError, ValueError):
        return False


def side_by_side(
    bench: Bench, *, flower: dict[str, Any], paths: tuple[str, ...], e2e: bench_fl_e2e.Config | None = None
) -> dict[str, Any]:
    """FedAvg on each Tether path in `paths` ("in-process", "e2e") against Flower's curve. The headline keys
    (`tether_accuracy`, `tether_round_s`, `round_time_ratio`, `max_round_gap`, `tether_path`) are the end-to-end
    path's when it ran, else the in-process one's; `tether_paths` holds each path's own."""
    rounds = bench.setup.rounds
    out: dict[str, Any] = {
        "participants": [list(p) for p in bench.plan[:rounds]],
        "centralized_accuracy": centralized(bench, epochs=(1, 3) if rounds < 30 else (3, 30)),
    }
    index = {s.device: i for i, s in enumerate(bench.split.shards)}
    if "skipped" in flower:
        out.update(flower=flower, flower_accuracy=None, flower_round_s=None)
    else:
        out.update(
            flower={k: v for k, v in flower.items() if k not in ("accuracy", "round_s", "participants", "loss")},
            flower_accuracy=flower["accuracy"],
            flower_loss=flower["loss"],
            flower_round_s=statistics.median(flower["round_s"]),
            flower_round_s_all=flower["round_s"],
            same_participants=flower["participants"] == [[index[d] for d in p] for p in bench.plan[:rounds]],
        )
    per_path: dict[str, dict[str, Any]] = {}
    if "in-process" in paths:
        curve = bench.run(strategies.FedAvg(), rounds=rounds, label="tether fedAvg")
        per_path["in-process"] = _figures(curve, round_s=curve.round_s, name=bench.path.name, flower=out)
    if "e2e" in paths:
        per_path["e2e"] = end_to_end(bench, flower=out, config=e2e or bench_fl_e2e.Config())
    out.update(per_path.get("e2e") or per_path["in-process"])
    out["tether_paths"] = per_path
    if len(per_path) == 2:  # the same maths through two paths: the curves agree up to float32 rounding
        pairs = zip(per_path["e2e"]["tether_accuracy"], per_path["in-process"]["tether_accuracy"], strict=True)
        out["e2e_vs_in_process_max_gap"] = max(abs(a - b) for a, b in pairs)
    return out


def _figures(curve: bench_fl_sim.Curve, *, round_s: list[float], name: str, flower: dict[str, Any]) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "tether_path": name,
        "tether_accuracy": curve.accuracy,
        "tether_loss": curve.loss,
        "tether_round_s": statistics.median(round_s),
        "tether_round_s_all": round_s,
        "max_round_gap": None,
        "round_time_ratio": None,
    }
    if flower.get("flower_accuracy") is not None:
        gaps = [abs(a - b) for a, b in zip(curve.accuracy, flower["flower_accuracy"], strict=True)]
        figures["max_round_gap"] = max(gaps)
        figures["round_time_ratio"] = figures["tether_round_s"] / flower["flower_round_s"]
    return figures


def end_to_end(bench: Bench, *, flower: dict[str, Any], config: bench_fl_e2e.Config) -> dict[str, Any]:
    """FedAvg through the whole system (`bench_fl_e2e`): each round's participants checked against the bench's
    draw, each round's model exported and scored here, round times from the rounds' timestamps."""
    _say(f"tether e2e: starting the stack and {len(bench.split.shards)} agents")
    with bench_fl_e2e.stdout_to_stderr():
        return _end_to_end(bench, flower=flower, config=config)


def _end_to_end(bench: Bench, *, flower: dict[str, Any], config: bench_fl_e2e.Config) -> dict[str, Any]:
    rounds = bench.setup.rounds
    path = bench_fl_e2e.EndToEndPath(config, split=bench.split, example=bench.example)
    try:
        path.start(say=lambda text: _say(f"tether e2e: {text}"))
        initial = path.initial()
        ours = bench.initial()
        if sorted(initial) != sorted(ours) or not all(np.array_equal(initial[n], ours[n]) for n in ours):
            raise click.ClickException("the bundle's model.safetensors is not fltrain.initial_weights(0)")

        def progress(r: int, accuracy: float) -> None:
            _say(f"tether e2e: round {r}/{rounds} accuracy {accuracy:.3f}")

        curve = bench_fl_sim.run_rounds(
            path,
            strategy=strategies.FedAvg(),
            initial=initial,
            plan=bench.plan[:rounds],
            evaluate=bench.evaluate,
            progress=progress,
        )
        timings = dict(path.run.timings)
    except bench_fl_e2e.RunFailed as e:
        raise click.ClickException(f"the end-to-end run failed: {e}") from None
    finally:
        path.close()
    times = bench_fl_e2e.summary(path.records)
    figures = _figures(curve, round_s=times["round_s_all"], name=path.name, flower=flower)
    figures["e2e"] = {
        "agents": len(bench.split.shards),
        "per_round": config.per_round,
        "participants_as_drawn": True,  # every round checked (the run stops otherwise)
        "round_clock": "PostgreSQL: fl_rounds.created_at (round opened) to the round's derived version applied",
        "pace_median_s": times["pace"],
        "driver_interval_s": config.driver_interval_s,
        "round_deadline_s": config.deadline_s,
        "quorum": "all selected",
        "warm_task_workers": config.concurrency,
        "refused": [r.refused for r in path.records],
        "startup_s": timings,
    }
    return figures


def centralized(bench: Bench, *, epochs: tuple[int, ...]) -> dict[str, float]:
    """The same model and training function on all devices' data pooled: held-out accuracy after each count of
    epochs (the reference a federated run approaches)."""
    X = np.concatenate([s.X for s in bench.split.shards])
    y = np.concatenate([s.y for s in bench.split.shards])
    weights = bench.initial()
    out: dict[str, float] = {}
    for epoch in range(max(epochs)):
        weights, _ = bench.fltrain.train(
            weights, X, y, lr=bench.setup.lr, batch=bench.setup.batch, epochs=1, seed=bench.setup.batch_seed(epoch)
        )
        if epoch + 1 in epochs:
            out[str(epoch + 1)] = bench.evaluate(weights)["accuracy"]
    return out


def best_strategy(bench: Bench, *, max_rounds: int, grid: list[tuple[str, strategies.Strategy]]) -> dict[str, Any]:
    tried: list[dict[str, Any]] = []
    for name, strategy in grid:
        curve = bench.run(strategy, rounds=max_rounds, stop_at=TARGET)
        reached = curve.rounds_to(TARGET)
        tried.append(
            {
                "strategy": name,
                "parameters": strategies.strategy_document(strategy),
                "rounds_to_0_90": reached,
                "best_accuracy": max(curve.accuracy),
                "rounds_run": len(curve.round_s),
            }
        )
        _say(f"best strategy: {name} {strategies.strategy_document(strategy)} -> rounds to {TARGET}: {reached}")
    per_strategy: dict[str, dict[str, Any]] = {}
    for row in tried:
        held = per_strategy.get(row["strategy"])
        if held is None or _rank(row) < _rank(held):
            per_strategy[row["strategy"]] = row
    best = min(per_strategy.values(), key=_rank)
    return {
        "best_strategy": best["strategy"],
        "best_parameters": best["parameters"],
        "best_rounds_to_0_90": best["rounds_to_0_90"],
        "rounds_to_0_90": per_strategy,
        "strategy_grid": tried,
        "max_rounds": max_rounds,
    }


def _rank(row: dict[str, Any]) -> tuple[int, float]:
    reached = row["rounds_to_0_90"]
    return (reached if reached is not None else 10**9, -row["best_accuracy"])


def aggregation(*, updates: int, params: int, block: int, workdir: pathlib.Path, seed: int) -> dict[str, Any]:
    directory = workdir / "updates"
    _say(f"aggregation: writing {updates} updates x {params} float32 parameters to {directory}")
    update_bytes = bench_fl_agg.prepare(directory, updates=updates, params=params, seed=seed)
    try:
        sides = {}
        for side in ("tether", "numpy"):
            sides[side] = bench_fl_agg.measure(directory, side=side, updates=updates, block=min(block, updates))
            _say(f"aggregation: {side} {sides[side]['seconds']:.2f} s, peak {sides[side]['peak_rss'] / 1e6:.0f} MB")
        a = np.load(directory / "result-tether.npy")
        b = np.load(directory / "result-numpy.npy")
        agree = bool(np.allclose(a, b, rtol=1e-5, atol=1e-7))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if not agree:
        raise click.ClickException("the streaming fold and NumPy disagree on the mean")
    t, n = sides["tether"], sides["numpy"]
    return {
        "aggregation_path": "pure fold: tether.controller.fl.aggregators.MeanFold.add + finish(FedAvg), the "
        "functions the Celery worker calls, in a process of their own (not through Celery)",
        "aggregation_updates": updates,
        "aggregation_params": params,
        "aggregation_update_bytes": update_bytes,
        "aggregation_tether": t,
        "aggregation_numpy": n,
        "aggregation_numpy_form": f"np.einsum('i,ij->j', samples, np.stack(block)) over blocks of {block} updates",
        "aggregation_throughput_ratio": n["seconds"] / t["seconds"],
        "aggregation_peak_memory_ratio": (t["peak_rss"] - t["rss_before"]) / update_bytes,
        "aggregation_numpy_peak_memory_ratio": (n["peak_rss"] - n["rss_before"]) / update_bytes,
        "aggregation_results_agree": agree,
    }


def robustness(bench: Bench, *, rounds: int) -> dict[str, Any]:
    devices = [s.device for s in bench.split.shards]
    attackers = bench_fl_sim.poisoned_devices(devices, fraction=POISONED_FRACTION, seed=bench.setup.seed)
    per_round = [sum(d in attackers for d in p) for p in bench.plan[:rounds]]
    results: dict[str, Any] = {}
    for name, strategy in ROBUST:
        clean = bench.run(strategy, rounds=rounds).accuracy[-1]
        attacked = bench.run(strategy, rounds=rounds, poisoned=attackers)
        poisoned = attacked.accuracy[-1]
        results[name] = {
            "parameters": strategies.strategy_document(strategy),
            "clean": clean,
            "poisoned": poisoned,
            "drop": clean - poisoned,
            "poisoned_curve": attacked.accuracy,
            "refused_updates": sum(attacked.refused),
        }
        _say(f"robustness: {name} clean {clean:.3f} poisoned {poisoned:.3f}")
    clean_fedavg = results["fedAvg"]["clean"]
    for row in results.values():
        row["gap_to_clean_fedAvg"] = clean_fedavg - row["poisoned"]
    return {
        "poisoned": results,
        "poisoned_devices": sorted(attackers),
        "poisoned_per_round": per_round,
        "poison": f"{POISONED_FRACTION:.0%} of devices send {bench_fl_sim.POISON_SCALE:g} x their delta",
    }


@click.command("fl")
@click.option("--quick", is_flag=True, help="A toy size (3 rounds, 20 updates x 20k parameters) for tests.")
@click.option("--rounds", type=click.IntRange(1, 1000), default=None, help="Rounds of the side-by-side run [30].")
@click.option("--max-rounds", type=click.IntRange(1, 1000), default=None, help="Cap of the rounds-to-0.90 runs [100].")
@click.option("--flower-python", default=None, help="An interpreter with flwr[simulation] (default: this one).")
@click.option("--no-flower", is_flag=True, help="Skip the Flower half.")
@click.option("--ray-cpus", type=click.IntRange(1, 256), default=2, show_default=True, help="CPUs Ray may use.")
@click.option("--agg-updates", type=click.IntRange(2, 100_000), default=None, help="Updates folded [1000].")
@click.option("--agg-params", type=click.IntRange(1, 100_000_000), default=None, help="Parameters each [1000000].")
@click.option("--agg-block", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.option("--sections", default="flower,best,aggregation,robustness", show_default=True)
@click.option(
    "--tether-path",
    type=click.Choice(["both", "e2e", "in-process"]),
    default=None,
    help="Tether's side of the Flower comparison: the whole system (e2e: controller, Celery worker, PostgreSQL, "
    "real agents), the in-process strategies, or both [both; in-process with --quick].",
)
@click.option("--devices", type=click.IntRange(2, 1000), default=None, help="Devices [100; quick e2e: 6].")
@click.option("--per-round", type=click.IntRange(1, 1000), default=None, help="Per round [10; quick e2e: 2].")
@click.option("--workdir", type=click.Path(file_okay=False), default=None, help="Scratch space (default: a temp dir).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the JSON report here.")
@click.option("--markdown", "markdown_out", type=click.Path(dir_okay=False), default=None, help="And the curves here.")
def fl(
    quick: bool,
    rounds: int | None,
    max_rounds: int | None,
    flower_python: str | None,
    no_flower: bool,
    ray_cpus: int,
    agg_updates: int | None,
    agg_params: int | None,
    agg_block: int,
    sections: str,
    tether_path: str | None,
    devices: int | None,
    per_round: int | None,
    workdir: str | None,
    out: str | None,
    markdown_out: str | None,
) -> None:
    """FedAvg side by side with Flower, Tether's best strategy, aggregation at scale, robustness to poisoning."""
    wanted = {s.strip() for s in sections.split(",") if s.strip()}
    unknown = wanted - {"flower", "best", "aggregation", "robustness"}
    if unknown:
        raise click.BadParameter(f"unknown sections {sorted(unknown)}", param_hint="--sections")
    tether_path = tether_path or ("in-process" if quick else "both")
    paths = ("in-process", "e2e") if tether_path == "both" else (tether_path,)
    small = quick and "e2e" in paths  # the suite's size of the end-to-end run: 6 agents, 2 a round, 2 rounds
    rounds = rounds or (2 if small else 3 if quick else 30)
    max_rounds = max_rounds or (5 if quick else 100)
    agg_updates = agg_updates or (20 if quick else 1000)
    agg_params = agg_params or (20_000 if quick else 1_000_000)
    devices = devices or (6 if small else fldata.DEVICES)
    per_round = per_round or (2 if small else 10)
    if per_round > devices:
        raise click.BadParameter(f"{per_round} participants a round out of {devices} devices", param_hint="--per-round")
    setup = bench_fl_sim.Setup(rounds=rounds, per_round=per_round)
    started = time.perf_counter()
    bench = prepare(setup=setup, schedule_rounds=max(rounds, max_rounds), devices=devices)
    _say(f"{len(bench.split.shards)} devices, {len(bench.split.y_test)} held-out samples, {rounds} rounds")
    report: dict[str, Any] = {
        "benchmark": "fl",
        "quick": quick,
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": _cpus()},
        "setup": {
            **dataclasses.asdict(setup),
            "devices": len(bench.split.shards),
            "dirichlet_alpha": fldata.ALPHA,
            "test_fraction": fldata.TEST_FRACTION,
            "model": "64-32-10 MLP (examples/digits-fl/task/fltrain.py, MNN)",
        },
    }
    with tempfile.TemporaryDirectory(prefix="tether-bench-fl-", dir=workdir) as tmp:
        scratch = pathlib.Path(tmp)
        if "flower" in wanted:
            flower = (
                {"skipped": "--no-flower"}
                if no_flower
                else flower_side(bench, python=flower_python, workdir=scratch, cpus=ray_cpus)
            )
            if "skipped" in flower:
                _say(f"flower: skipped: {flower['skipped']}")
            e2e = bench_fl_e2e.Config(per_round=per_round, rounds=rounds, seed=setup.seed)
            report.update(side_by_side(bench, flower=flower, paths=paths, e2e=e2e))
        if "best" in wanted:
            report.update(best_strategy(bench, max_rounds=max_rounds, grid=QUICK_GRID if quick else GRID))
        if "aggregation" in wanted:
            report.update(
                aggregation(updates=agg_updates, params=agg_params, block=agg_block, workdir=scratch, seed=setup.seed)
            )
        if "robustness" in wanted:
            report.update(robustness(bench, rounds=rounds))
    report["wall_s"] = time.perf_counter() - started
    text = json.dumps(report, indent=2)
    if out:
        pathlib.Path(out).write_text(text + "\n", encoding="utf-8")
        _say(f"wrote {out}")
    if markdown_out:
        pathlib.Path(markdown_out).write_text(markdown(report), encoding="utf-8")
        _say(f"wrote {markdown_out}")
    click.echo(text)


def markdown(report: dict[str, Any]) -> str:
    """The accuracy curves side by side and the headline figures, as a Markdown table (docs/benchmarks.md)."""
    tether = report.get("tether_accuracy") or []
    flower = report.get("flower_accuracy") or [None] * len(tether)
    lines = ["| round | Flower FedAvg | Tether FedAvg | gap |", "|---:|---:|---:|---:|"]
    for r, (t, f) in enumerate(zip(tether, flower, strict=True)):
        gap = "" if f is None else f"{abs(t - f):.3f}"
        lines.append(f"| {r} | {'' if f is None else f'{f:.3f}'} | {t:.3f} | {gap} |")
    return "\n".join(lines) + "\n"


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
