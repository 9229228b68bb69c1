"""`tether bench runtime`: backend selection and the agent's inference overhead, on real models.

For each model (an MLP, a small CNN, EfficientNet-Lite0 and a transformer
encoder with integer inputs, `input_ids` + `attention_mask`; `bench/models/`,
built by `bench/models/build.py` and `build_encoder.py`, committed as .onnx +
.mnn), or every model of any other folder (`--models-dir`: `models.json`, or
each `NAME.onnx` with its `NAME.mnn` conversion), on inputs of the right dtype
and meaning (`tether.agent.modelinputs`: `NAME.inputs.npz` when the folder
ships one, else generated per dtype and input name):

1. Selection as the agent runs it: `backends.select_in_child` (a child
   process, cost-model pruning, measuring within `--budget`) →
   `chosen`, `selection_seconds` (wall time, process start included).
2. Ground truth in the same run: every candidate the structural rules allow
   (pruned ones included), measured round-robin for `--truth-seconds` →
   the latency of every candidate, `best`, and `chosen_over_best` =
   truth[chosen] / truth[best] (goal ≤ 1.05).
3. `agent_over_raw`: the agent's real task path (a worker child started by
   `runtime.run_task`, the chosen candidate loaded by the worker, an
   entrypoint calling `ctx.model.run` K times and timing each call) against
   the engine called directly (MNN's Interpreter/Session API, or an ONNX
   Runtime session) in a child process with the same environment, on the same
   input, timed the same way. The ratio of the per-inference medians (goal ≤
   1.05), taken over `--trials` alternating runs. The end-to-end ratio
   (process start and model load included) is reported beside it.
4. `agent_over_raw_same_io`: the agent against a second direct baseline that
   moves data the way the agent's MNN wrapper does (the caller's array written
   into the session's own input memory, outputs copied out of the session's
   output memory: no host tensors, no copyFrom/copyToHostTensor), so what is
   left is the wrapper's own cost (validation, the lock, the dict). For ONNX
   Runtime there is no other way to call it: the second baseline is the first.

5. `latency` (`tether.devtools.bench_latency`, `--latency-runs 0` skips it):
   trigger → result of a pattern-triggered digits inference on a warm worker,
   a worker forked from the zygote (cold), a fresh interpreter, and the model
   alone; 8 tasks at once warm vs cold; memory per warm worker. Its headline
   figures are copied to the top level (`warm_p50_ms`, `cold_p50_ms`, ...).

Writes JSON to --out; prints a table.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

import click
import numpy as np

from tether.agent import backends, modelinputs, profile, selection
from tether.agent import runtime as runtime_mod
from tether.common import manifest
from tether.devtools import bench_latency

MODELS = ("mlp", "cnn", "efficientnet_lite0", "encoder")
GOAL = 1.05

TASK_SOURCE = '''"""Benchmark task: K timed inferences through ctx.model (the agent's task path)."""
import time

import numpy as np


def run(ctx):
    with np.load(f"{ctx.data_dir}/inputs.npz", allow_pickle=False) as npz:
        inputs = {k: npz[k] for k in npz.files}
    k, warmup = int(ctx.state["k"]), int(ctx.state["warmup"])
    model = ctx.model
    for _ in range(warmup):
        model.run(inputs)
    times = []
    for _ in range(k):
        t0 = time.perf_counter()
        model.run(inputs)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "sample_count": k,
        "metrics": {"median_ms": times[k // 2] * 1e3, "mean_ms": sum(times) / k * 1e3},
        "counts": {"k": k},
    }
'''

RAW_SOURCE = """
import json, sys, time
import numpy as np

job = json.load(open(sys.argv[1]))
with np.load(job["inputs"], allow_pickle=False) as npz:
    inputs = {k: npz[k] for k in npz.files}
k, warmup, threads = job["k"], job["warmup"], job["threads"]
if job["engine"] == "mnn":
    import MNN

    interp = MNN.Interpreter(job["model"])
    session = interp.createSession({"backend": job["backend"].upper(), "numThread": threads,
                                    "precision": job["precision"]})
    tensors = {n: interp.getSessionInput(session, n) for n in inputs}
    halide = {n: MNN.Halide_Type_Int if a.dtype.kind in "iu" else MNN.Halide_Type_Float for n, a in inputs.items()}
    for n, a in inputs.items():
        interp.resizeTensor(tensors[n], a.shape)
    interp.resizeSession(session)
    # The best direct use: output tensors and their host copies prepared once, as the agent's wrapper does.
    outs = []
    for n in interp.getSessionOutputAll(session):
        o = interp.getSessionOutput(session, n)
        outs.append((n, o, MNN.Tensor(o.getShape(), MNN.Halide_Type_Float, np.zeros(o.getShape(), np.float32),
                                      MNN.Tensor_DimensionType_Caffe)))

    def once():
        for n, a in inputs.items():
            tensors[n].copyFrom(MNN.Tensor(a.shape, halide[n], a, MNN.Tensor_DimensionType_Caffe))
        interp.runSession(session)
        out = {}
        for n, o, host in outs:
            o.copyToHostTensor(host)
            out[n] = np.array(host.getNumpyData(), copy=True)
        return out

    if job.get("io") == "session":
        # The second baseline ("same I/O"): data moved as the agent's wrapper moves it. On the CPU backend a
        # session tensor of host layout (NCHW/NHWC) is the session's own memory as an array: write inputs
        # into it, copy outputs out of it. Checked once against the documented path above.
        host_layouts = (MNN.Tensor_DimensionType_Caffe, MNN.Tensor_DimensionType_Tensorflow)
        session_tensors = list(tensors.values()) + [o for _, o, _ in outs]
        assert all(t.getDimensionType() in host_layouts for t in session_tensors), "no host layout: no views"
        expected = once()
        views = {n: t.getNumpyData() for n, t in tensors.items()}
        out_views = [(n, o.getNumpyData()) for n, o, _ in outs]

        def once():
            for n, a in inputs.items():
                views[n][...] = a
            interp.runSession(session)
            return {n: v.copy() for n, v in out_views}

        got = once()
        assert all(np.array_equal(got[n], expected[n]) for n in expected), "same-I/O baseline differs"
else:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[job["backend"]]
    sess = ort.InferenceSession(job["model"], sess_options=options, providers=[provider, "CPUExecutionProvider"])

    def once():
        return sess.run(None, inputs)

for _ in range(warmup):
    once()
times = []
for _ in range(k):
    t0 = time.perf_counter()
    once()
    times.append(time.perf_counter() - t0)
times.sort()
print(json.dumps({"median_ms": times[k // 2] * 1e3}))
"""


@dataclasses.dataclass(frozen=True)
class BenchModel:
    name: str
    spec: backends.ModelSpec
    dir: pathlib.Path


def load_models(models_dir: pathlib.Path, names: list[str] | None) -> list[BenchModel]:
    """The models of `models_dir` (its `models.json`, else each NAME.onnx with NAME.mnn); `names`: a subset."""
    root = models_dir.resolve()
    index_path = root / "models.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
    else:  # any folder of models: NAME.onnx and/or NAME.mnn, input shapes the models' own
        stems = sorted({p.name.rsplit(".", 1)[0] for p in root.iterdir() if p.suffix in (".onnx", ".mnn")})
        index = {
            stem: {k: {"file": f"{stem}.{k}"} for k in ("onnx", "mnn") if (root / f"{stem}.{k}").is_file()}
            for stem in stems
        }
    unknown = sorted(set(names or ()) - set(index))
    if unknown:
        raise click.BadParameter(f"unknown models {unknown}; {root} has {sorted(index)}", param_hint="--models")
    out = []
    for name in names if names is not None else sorted(index):
        info = index[name]
        engines = {"mnn": "mnn", "onnxruntime": "onnx"}
        files = {e: root / info[k]["file"] for e, k in engines.items() if k in info}
        spec = backends.ModelSpec(
            name=files.get("mnn", files.get("onnxruntime", root / name)).name,
            files={e: str(p) for e, p in files.items()},
            digests={e: info[k].get("sha256") or _digest(files[e]) for e, k in engines.items() if k in info},
            relpaths={e: p.name for e, p in files.items()},
            inputs={k: tuple(v) for k, v in (info.get("inputs") or {}).items()},
            samples=str(modelinputs.samples_path_for(root / name))
            if modelinputs.samples_path_for(root / name).is_file()
            else None,
        )
        out.append(BenchModel(name, spec, models_dir))
    return out


def _digest(path: pathlib.Path) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def ground_truth(
    spec: backends.ModelSpec, device: selection.Device, *, seconds: float, rounds: int = 5
) -> dict[str, float | None]:
    """Every structurally allowed candidate, measured round-robin (drift hits all alike); key -> median ms."""
    stats = selection.ModelStats(engines=frozenset(spec.files))
    candidates = selection.enumerate_candidates(engines=spec.files, device=device)
    allowed, _ = selection.prune(candidates, model=stats, device=device, slack=float("inf"), max_measured=10**6)
    loaded: dict[str, tuple[Any, dict[str, np.ndarray]]] = {}
    samples: dict[str, list[float]] = {}
    result: dict[str, float | None] = {}
    for c, _ in allowed:
        try:
            model = backends.load(c, spec.files[c.engine])
            if hasattr(model, "resize"):
                model.resize(spec.inputs)
            inputs = backends.input_arrays(model, spec.inputs, samples=spec.samples)
            for _ in range(3):
                model.run(inputs)
            loaded[c.key] = (model, inputs)
            samples[c.key] = []
        except Exception:
            result[c.key] = None
    per_slot = seconds / max(1, len(loaded) * rounds)
    for _ in range(rounds):
        for key, (model, inputs) in loaded.items():
            deadline = time.perf_counter() + per_slot
            n = 0
            while n < 5 or time.perf_counter() < deadline:
                t0 = time.perf_counter()
                model.run(inputs)
                samples[key].append(time.perf_counter() - t0)
                n += 1
    for key, values in samples.items():
        result[key] = selection.median_ms(values)
    return result


def agent_vs_raw(
    m: BenchModel, chosen: selection.Candidate, *, k: int, warmup: int, trials: int, work: pathlib.Path
) -> dict[str, Any]:
    """Per-inference medians through the agent's worker and through the raw engine (both baselines), alternating."""
    bundle_dir, data_dir = work / "bundle", work / "data"
    bundle_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    rel = m.spec.relpaths[chosen.engine]
    model_path = bundle_dir / rel
    model_path.write_bytes(pathlib.Path(m.spec.files[chosen.engine]).read_bytes())
    (bundle_dir / "task.py").write_text(TASK_SOURCE)
    # The chosen engine's own kind of inputs (ids as int32 for MNN, int64 for ONNX Runtime; masks of ones...).
    probe = backends.load(chosen, m.spec.files[chosen.engine])
    if hasattr(probe, "resize") and m.spec.inputs:
        probe.resize(m.spec.inputs)
    inputs = backends.input_arrays(probe, m.spec.inputs, samples=m.spec.samples)
    del probe
    np.savez(data_dir / "inputs.npz", **inputs)  # type: ignore[arg-type]  # numpy types **kwds by allow_pickle
    bundle = manifest.hash_directory(
        bundle_dir,
        name="bench-runtime",
        entrypoint="task.py",
        engines=[manifest.EngineNeeds(chosen.engine, rel, {n: tuple(a.shape) for n, a in inputs.items()})],
    )
    job = work / "raw.json"
    job.write_text(
        json.dumps(
            {
                "engine": chosen.engine,
                "backend": chosen.backend,
                "threads": chosen.threads,
                "precision": chosen.precision,
                "model": str(model_path),
                "inputs": str(data_dir / "inputs.npz"),
                "k": k,
                "warmup": warmup,
            }
        )
    )
    same_io_job = work / "raw-same-io.json"
    same_io_job.write_text(json.dumps({**json.loads(job.read_text()), "io": "session"}))
    limits = runtime_mod.TaskLimits(timeout_s=600, memory_mb=8192)
    agent_ms, raw_ms, same_io_ms, agent_wall, raw_wall = [], [], [], [], []

    def raw_run(job_path: pathlib.Path) -> float:
        proc = subprocess.run(
            [sys.executable, "-c", RAW_SOURCE, str(job_path)],
            capture_output=True,
            text=True,
            env=runtime_mod.worker_env(chosen.threads),
            timeout=600,
            check=True,
        )
        return float(json.loads(proc.stdout.strip().splitlines()[-1])["median_ms"])

    for _ in range(trials):
        t0 = time.perf_counter()
        outcome = asyncio.run(
            runtime_mod.run_task(
                bundle_dir=bundle_dir,
                bundle=bundle,
                data_dir=data_dir,
                state={"k": k, "warmup": warmup},
                limits=limits,
                threads=chosen.threads,
                work_dir=work,
                selection={rel: {"candidate": chosen.key, "model": rel}},
            )
        )
        agent_wall.append(time.perf_counter() - t0)
        if outcome.backend != chosen.backend_name:
            raise RuntimeError(f"the worker ran {outcome.backend}, not {chosen.backend_name}")
        agent_ms.append(float(outcome.result.metrics["median_ms"]))
        t0 = time.perf_counter()
        raw_ms.append(raw_run(job))
        raw_wall.append(time.perf_counter() - t0)
        if chosen.engine == "mnn":
            same_io_ms.append(raw_run(same_io_job))
    if not same_io_ms:  # ONNX Runtime: one way to call it, so the second baseline is the first
        same_io_ms = list(raw_ms)
    a, r, rs = statistics.median(agent_ms), statistics.median(raw_ms), statistics.median(same_io_ms)
    return {
        "agent_over_raw": a / r,
        "agent_over_raw_same_io": a / rs,
        "agent_ms": a,
        "raw_ms": r,
        "raw_same_io_ms": rs,
        "agent_ms_trials": agent_ms,
        "raw_ms_trials": raw_ms,
        "raw_same_io_ms_trials": same_io_ms,
        "agent_over_raw_end_to_end": statistics.median(agent_wall) / statistics.median(raw_wall),
        "k": k,
        "trials": trials,
    }


def run_benchmark(
    *,
    models_dir: pathlib.Path,
    names: list[str] | None,
    budget_s: float,
    truth_s: float,
    k: int,
    trials: int,
    progress: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    progress("profiling the device")
    load_before = os.getloadavg()
    device_profile = profile.collect(measure=True)
    device = backends.device_for(device_profile)
    results: dict[str, Any] = {}
    for m in load_models(models_dir, names):
        progress(f"{m.name}: backend selection (budget {budget_s:g}s)")
        t0 = time.perf_counter()
        answers = asyncio.run(backends.select_in_child([m.spec], device_profile, budget_s=budget_s))
        selection_wall = time.perf_counter() - t0
        chosen_sel = answers[m.spec.name]
        if not isinstance(chosen_sel, selection.Selection):
            raise click.ClickException(f"{m.name}: no candidate runs it: {chosen_sel}")
        progress(f"{m.name}: measuring every candidate ({truth_s:g}s)")
        truth = ground_truth(m.spec, device, seconds=truth_s)
        ok = {key: v for key, v in truth.items() if v is not None}
        best = min(ok, key=lambda key: ok[key])
        chosen = chosen_sel.chosen
        progress(f"{m.name}: agent task path vs raw engine ({chosen.key})")
        with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp:
            overhead = agent_vs_raw(
                m,
                chosen,
                k=_k_for(m, ok.get(chosen.key, 1.0), k),
                warmup=20,
                trials=trials,
                work=pathlib.Path(tmp),
            )
        measured = {x.candidate.key: x for x in chosen_sel.measurements}
        pruned = {p.candidate.key: p.reason for p in chosen_sel.pruned}
        stats = backends.model_stats(m.spec)
        results[m.name] = {
            "inputs": {n: list(s) for n, s in m.spec.inputs.items()},
            "flops": stats.flops,
            "candidates": {
                key: {
                    "latency_ms": truth.get(key),
                    "estimate_ms": measured[key].estimate_ms if key in measured else None,
                    "selection_latency_ms": measured[key].latency_ms if key in measured else None,
                    "pruned": pruned.get(key),
                }
                for key in sorted(set(truth) | set(pruned))
            },
            "chosen": chosen.key,
            "best": best,
            "chosen_over_best": (ok[chosen.key] / ok[best]) if chosen.key in ok else None,
            "selection_seconds": selection_wall,
            "selection_measure_seconds": chosen_sel.seconds,
            **overhead,
        }
    return {
        "benchmark": "runtime",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "device": device_profile.to_json(),
        "settings": {"budget_s": budget_s, "truth_seconds": truth_s, "k": k, "trials": trials},
        # Other work on the machine skews every figure: the 1-minute load average before and after.
        "load_average": {"before": load_before[0], "after": os.getloadavg()[0], "cores": device_profile.cores},
        "goals": {"chosen_over_best": GOAL, "agent_over_raw": GOAL},  # agent_over_raw_same_io has no goal
        "models": results,
    }


def _latency(runs: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """The latency section and its headline keys (examples/digits, from the repository root)."""
    digits = pathlib.Path("examples/digits")
    if not (digits / "task" / "model.mnn").is_file():
        raise click.ClickException("the latency section needs examples/digits (run from the repository root)")
    with tempfile.TemporaryDirectory(prefix="tether-bench-latency-") as tmp:
        lat = bench_latency.run_latency(
            digits_dir=digits / "task",
            data_file=digits / "device_data.npz",
            work=pathlib.Path(tmp),
            runs=runs,
            cold_runs=max(10, runs // 10),
            fresh_runs=max(5, runs // 30),
            progress=progress,
        )
    return {"latency": lat, **{key: lat[key] for key in bench_latency.HEADLINE}}


def _k_for(m: BenchModel, latency_ms: float, k: int) -> int:
    """At least `k` inferences, more for fast models, capped to about 3 s per run."""
    return int(max(min(k, 3000 / max(latency_ms, 1e-3)), min(20000, 300 / max(latency_ms, 1e-3))))


def _table(doc: Mapping[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title="tether bench runtime", show_lines=False)
    for col in ("model", "candidate", "latency ms", "selection", "chosen/best", "agent/raw", "same I/O", "select s"):
        table.add_column(col, justify="left" if col in ("model", "candidate", "selection") else "right")
    for name, r in doc["models"].items():
        first = True
        for key, c in r["candidates"].items():
            mark = "chosen" if key == r["chosen"] else ("pruned" if c["pruned"] else "measured")
            if key == r["best"]:
                mark += ", best"
            lat = "-" if c["latency_ms"] is None else f"{c['latency_ms']:.4f}"
            table.add_row(
                name if first else "",
                key,
                lat,
                mark,
                f"{r['chosen_over_best']:.3f}" if first and r["chosen_over_best"] else "",
                f"{r['agent_over_raw']:.3f}" if first else "",
                f"{r['agent_over_raw_same_io']:.3f}" if first else "",
                f"{r['selection_seconds']:.2f}" if first else "",
            )
            first = False
    return table


@click.command("runtime")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default="runtime-bench.json", show_default=True)
@click.option(
    "--models-dir",
    type=click.Path(file_okay=False, exists=True, path_type=pathlib.Path),
    default="bench/models",
    show_default=True,
    help="Any folder of models: models.json (bench/models/build.py), else each NAME.onnx with NAME.mnn.",
)
@click.option(
    "--models",
    "names",
    default=None,
    help=f"Comma-separated subset (default: every model of the folder; bench/models has {','.join(MODELS)}).",
)
@click.option(
    "--budget",
    "budget_s",
    type=float,
    default=backends.DEFAULT_BUDGET_S,
    show_default=True,
    help="Selection's measuring budget per model, seconds.",
)
@click.option(
    "--truth-seconds",
    "truth_s",
    type=float,
    default=10.0,
    show_default=True,
    help="Time to measure every candidate for the ground truth, per model.",
)
@click.option("--k", type=int, default=300, show_default=True, help="Timed inferences per agent/raw run (at least).")
@click.option("--trials", type=int, default=5, show_default=True, help="Alternating agent/raw (/same-I/O raw) runs.")
@click.option(
    "--latency-runs",
    type=click.IntRange(min=0),
    default=300,
    show_default=True,
    help="Warm trigger -> result runs for the latency section (0: skip it); cold and fresh take fewer.",
)
def runtime(
    out_path: str,
    models_dir: pathlib.Path,
    names: str | None,
    budget_s: float,
    truth_s: float,
    k: int,
    trials: int,
    latency_runs: int = 300,
) -> None:
    """Backend selection (chosen vs best) and agent overhead (agent vs raw engine) per model; JSON to --out."""
    from rich.console import Console

    console = Console(stderr=True)
    wanted = None if names is None else [n.strip() for n in names.split(",") if n.strip()]
    load_models(models_dir, wanted)  # unknown names and unreadable folders fail here, before any measuring
    with console.status("starting") as status:
        doc = run_benchmark(
            models_dir=models_dir,
            names=wanted,
            budget_s=budget_s,
            truth_s=truth_s,
            k=k,
            trials=trials,
            progress=lambda msg: status.update(msg),
        )
        if latency_runs:
            doc.update(_latency(latency_runs, lambda msg: status.update(msg)))
    doc["command"] = "tether bench runtime " + " ".join(sys.argv[3:]) if len(sys.argv) > 2 else "tether bench runtime"
    pathlib.Path(out_path).write_text(json.dumps(doc, indent=2) + "\n")
    Console(width=None if sys.stdout.isatty() else 160).print(_table(doc))
    if "latency" in doc:
        Console(width=None if sys.stdout.isatty() else 160).print(bench_latency.table(doc["latency"]))
    click.echo(f"wrote {out_path}")
