"""Backend selection, the I/O part: measure candidates on the real model, cache, run off the loop.

`tether.agent.selection` decides (candidates, cost model, choice); this
module measures and remembers:

- `ModelSpec` / `specs_for`: the models of a bundle. An `engines[]` entry
  names its model file; a file beside it with the same stem and the other
  engine's extension (`model.mnn` next to `model.onnx`) is an alternative
  format of the same model, so both engines are candidates.
- `measure`: load the model on one candidate (checking the backend it
  *really* got: MNN falls back to CPU silently), warm up, time `reps` runs,
  median, on inputs of the model's dtype and meaning (`modelinputs`: the
  bundle's `<stem>.inputs.npz`, else generated per dtype and input name).
- `cross_check`: a bundle shipping both formats has its MNN file checked
  against its ONNX file on the device first (`crosscheck`); MNN candidates of
  a model that disagrees are pruned with the reason, never selected.
- `select_model`: profile → candidates → prune → measure within the budget
  → choose. Blocking; `python -m tether.agent.backends JOB OUT` runs it in a
  child process, which is how the daemon calls it (`Selector.select`): native
  engine code, threads and crashes stay out of the agent, and the event loop
  stays free.
- `SelectionCache`: the decisions, one JSON file in the agent's state dir,
  keyed by (model key, device fingerprint).
- `Selector`: what the daemon holds: the device profile, the cache, at most
  one selection in flight per model (a simulated fleet shares one).

A model no candidate can load or run (corrupt file, declared input shapes it
does not accept) raises `ModelUnusable`, a `VerificationFailed`: the daemon
refuses that version with the engines' messages, before it is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from tether.agent import crosscheck, modelinputs, selection
from tether.agent import profile as profile_mod
from tether.common import errors, manifest

log = logging.getLogger(__name__)

CACHE_FILE = "backends.json"
MAX_CACHE_ENTRIES = 256
DEFAULT_BUDGET_S = 5.0
WARMUP_RUNS = 2
# The on-device cross-check's tolerance, of the output scale: a device cannot tell whether weights were stored
# as fp16 (`tether model convert --fp16`), so it allows what fp16 storage does; a wrong conversion is far off.
DEVICE_TOLERANCE = modelinputs.TOLERANCE_FP16
DISAGREES = "disagrees with"  # how a pruned MNN candidate's reason starts when the cross-check refused it


class ModelUnusable(errors.VerificationFailed):
    """No candidate could load or run the model: the bundle is refused on this device."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model of a bundle: its formats (engine -> file), their digests, the declared input shapes."""

    name: str  # the engines[] entry's model path inside the bundle
    files: Mapping[str, str]  # engine -> path on disk
    digests: Mapping[str, str]  # engine -> sha256 digest
    relpaths: Mapping[str, str]  # engine -> path inside the bundle
    inputs: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    samples: str | None = None  # sample inputs shipped beside the model (`modelinputs.SAMPLES_SUFFIX`)
    samples_digest: str = ""

    @property
    def key(self) -> str:
        digests = {**self.digests, "samples": self.samples_digest} if self.samples_digest else self.digests
        return selection.model_key(digests, self.inputs)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "files": dict(self.files),
            "digests": dict(self.digests),
            "relpaths": dict(self.relpaths),
            "inputs": {k: list(v) for k, v in self.inputs.items()},
            "samples": self.samples,
            "samples_digest": self.samples_digest,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ModelSpec:
        return cls(
            name=str(doc["name"]),
            files=dict(doc["files"]),
            digests=dict(doc["digests"]),
            relpaths=dict(doc.get("relpaths") or {}),
            inputs={k: tuple(int(d) for d in v) for k, v in (doc.get("inputs") or {}).items()},
            samples=doc.get("samples"),
            samples_digest=str(doc.get("samples_digest") or ""),
        )


def specs_for(
    bundle: manifest.Manifest, *, path_of: Callable[[manifest.FileEntry], os.PathLike[str] | str]
) -> list[ModelSpec]:
    """The bundle's models with their alternative formats; `path_of` says where a file's bytes are."""
    by_path = {f.path: f for f in bundle.files}
    specs = []
    for need in bundle.engines:
        formats = {need.engine: need.model}
        stem = need.model.rsplit(".", 1)[0] if "." in need.model.rsplit("/", 1)[-1] else need.model
        for ext, engine in selection.FORMATS.items():
            if engine not in formats and stem + ext in by_path:
                formats[engine] = stem + ext
        entries = {engine: by_path[rel] for engine, rel in formats.items() if rel in by_path}
        shipped = by_path.get(stem + modelinputs.SAMPLES_SUFFIX)
        specs.append(
            ModelSpec(
                name=need.model,
                files={e: os.path.abspath(path_of(f)) for e, f in entries.items()},
                digests={e: f.sha256 for e, f in entries.items()},
                relpaths={e: f.path for e, f in entries.items()},
                inputs=dict(need.inputs),
                samples=None if shipped is None else os.path.abspath(path_of(shipped)),
                samples_digest="" if shipped is None else shipped.sha256,
            )
        )
    return specs


# ---------------------------------------------------------------- loading and measuring


def load(candidate: selection.Candidate, path: str | os.PathLike[str]) -> Any:
    """Load `path` on `candidate`; FailedPrecondition when the engine silently runs another backend."""
    from tether.agent import engine

    if candidate.engine == "mnn":
        eng: Any = engine.MNNEngine(precision=candidate.precision)
    else:
        eng = engine.get_engine(candidate.engine)
    model = eng.load(str(path), backend=candidate.backend, threads=candidate.threads)
    if model.backend != candidate.backend_name:
        raise errors.FailedPrecondition(f"asked for {candidate.backend_name}, the engine runs {model.backend}")
    return model


def input_arrays(
    model: Any, shapes: Mapping[str, tuple[int, ...]], *, samples: str | os.PathLike[str] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Inputs for timing, of the right dtype and meaning: the first shipped sample, else a generated one."""
    specs = modelinputs.describe(model, shapes)
    if samples is not None and os.path.isfile(samples):
        return modelinputs.load_samples(samples, specs)[0]
    return modelinputs.generate(specs, seed=seed)[0]


def mnn_flops(path: str | os.PathLike[str], shapes: Mapping[str, tuple[int, ...]]) -> float | None:
    """FLOPs of one inference as MNN counts them for a CPU session at `shapes` (None if it cannot tell)."""
    try:
        from tether.agent import engine

        model = engine.MNNEngine().load(str(path), backend="cpu", threads=1)
        if shapes:
            model.resize(shapes)
        mflops = float(model._interp.getSessionInfo(model._session, 1))
        return mflops * 1e6 if mflops > 0 else None
    except Exception:
        return None


def measure(
    candidate: selection.Candidate,
    path: str | os.PathLike[str],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    time_left_s: float,
    candidates_left: int = 1,
    estimate_ms: float | None = None,
    max_reps: int = 200,
    clock: Callable[[], float] = time.perf_counter,
    samples: str | os.PathLike[str] | None = None,  # sample inputs shipped with the model
) -> selection.Measurement:
    """Median latency of one inference on `candidate` (on the model's own kind of inputs), or the error."""
    try:
        model = load(candidate, path)
        if shapes and hasattr(model, "resize"):
            model.resize(shapes)
        inputs = input_arrays(model, shapes, samples=samples)
        times: list[float] = []
        run_s = 0.0
        for _ in range(WARMUP_RUNS):
            t0 = clock()
            model.run(inputs)
            run_s = clock() - t0
        reps = selection.reps_for(
            time_left_s=time_left_s, candidates_left=candidates_left, run_s=run_s, max_reps=max_reps
        )
        for _ in range(reps):
            t0 = clock()
            model.run(inputs)
            times.append(clock() - t0)
        return selection.Measurement(candidate, selection.median_ms(times), reps=reps, estimate_ms=estimate_ms)
    except Exception as e:  # every failure is an answer about this candidate
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return selection.Measurement(
            candidate, None, error=f"{type(e).__name__}: {message}"[:500], estimate_ms=estimate_ms
        )


def device_for(p: profile_mod.DeviceProfile) -> selection.Device:
    return selection.Device(
        cores=p.cores, backends=frozenset(p.backends), gflops_per_core=p.gflops_per_core or 0.0, fp16=p.fp16
    )


def cross_check(spec: ModelSpec) -> str:
    """Why the MNN model must not be selected (it disagrees with the ONNX model it ships beside), or ""."""
    if "mnn" not in spec.files or "onnxruntime" not in spec.files:
        return ""
    name = spec.relpaths.get("onnxruntime", "the ONNX model")
    try:
        checked = crosscheck.check(
            spec.files["onnxruntime"],
            spec.files["mnn"],
            tolerance=DEVICE_TOLERANCE,
            shapes=spec.inputs,
            samples=spec.samples,
        )
    except modelinputs.Mismatch as e:
        log.warning("%s: the MNN model disagrees with %s, MNN not selected: %s", spec.name, name, e)
        return f"{DISAGREES} {name}: {e}"[:500]
    except errors.TetherError as e:  # nothing to compare against (no onnxruntime, a model that will not load,
        log.info("%s: MNN not cross-checked against %s: %s", spec.name, name, e)  # inputs that prove nothing)
        return ""
    log.info("%s: MNN agrees with %s (max diff %.3g on %d %s inputs)", spec.name, name, checked.max_abs_diff,
             checked.samples, checked.source)  # fmt: skip
    return ""


def model_stats(spec: ModelSpec) -> selection.ModelStats:
    flops = mnn_flops(spec.files["mnn"], spec.inputs) if "mnn" in spec.files else None
    io_bytes = sum(4 * int(np.prod(s)) for s in spec.inputs.values())
    return selection.ModelStats(engines=frozenset(spec.files), flops=flops, io_bytes=io_bytes)


def select_model(
    spec: ModelSpec,
    device_profile: profile_mod.DeviceProfile,
    *,
    budget_s: float = DEFAULT_BUDGET_S,
    exhaustive: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> selection.Selection:
    """Choose how to run `spec` here (blocking). NoUsableCandidate when nothing runs it.

    `exhaustive` measures every candidate the structural rules allow (the
    benchmark's ground truth), ignoring the cost model and the survivor cap.
    """
    started = clock()
    device = device_for(device_profile)
    stats = model_stats(spec)
    candidates = selection.enumerate_candidates(engines=spec.files, device=device)
    reason = cross_check(spec)  # a converted model is checked against its source before it is selected
    refused = [selection.Pruned(c, reason) for c in candidates if reason and c.engine == "mnn"]
    candidates = [c for c in candidates if all(r.candidate != c for r in refused)]
    survivors, pruned = selection.prune(
        candidates,
        model=stats,
        device=device,
        slack=float("inf") if exhaustive else 2.5,
        max_measured=len(candidates) if exhaustive else 6,
    )
    measurements: list[selection.Measurement] = []
    deadline = clock() + budget_s  # the cross-check above does not eat into measuring
    for i, (candidate, estimate) in enumerate(survivors):
        left = deadline - clock()
        if left <= 0 and any(m.ok for m in measurements):
            pruned.append(selection.Pruned(candidate, f"time budget of {budget_s:g}s spent"))
            continue
        m = measure(
            candidate,
            spec.files[candidate.engine],
            spec.inputs,
            time_left_s=max(left, 0.0),
            candidates_left=len(survivors) - i,
            estimate_ms=estimate,
            clock=clock,
            samples=spec.samples,
        )
        if m.error and candidate.engine in spec.relpaths:  # name the bundle's file, not the blob it is stored as
            path = str(spec.files[candidate.engine])
            rel = spec.relpaths[candidate.engine]
            m = dataclasses.replace(m, error=m.error.replace(path, rel).replace(os.path.basename(path), rel))
        measurements.append(m)
    best = selection.choose(measurements)
    assert best.latency_ms is not None
    return selection.Selection(
        model_key=spec.key,
        fingerprint=device_profile.fingerprint,
        chosen=best.candidate,
        latency_ms=best.latency_ms,
        measurements=tuple(measurements),
        pruned=tuple(refused + pruned),
        seconds=clock() - started,
        created_at=time.time(),
    )


# ---------------------------------------------------------------- the cache


class SelectionCache:
    """Decisions by (model key, device fingerprint), persisted as one JSON file (atomic writes)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = pathlib.Path(path)
        self._entries: dict[str, selection.Selection] = {}
        self._load()

    def _load(self) -> None:
        try:
            doc = json.loads(self.path.read_text())
            entries = doc.get("entries") or {}
            self._entries = {k: selection.Selection.from_json(v) for k, v in entries.items()}
        except FileNotFoundError:
            self._entries = {}
        except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged cache only costs a re-selection
            log.warning("ignoring unreadable backend cache %s: %s", self.path, e)
            self._entries = {}

    def get(self, model_key: str, fingerprint: str) -> selection.Selection | None:
        found = self._entries.get(selection.cache_key(model_key, fingerprint))
        return found if found is not None and found.is_valid_for(model_key=model_key, fingerprint=fingerprint) else None

    def put(self, chosen: selection.Selection) -> None:
        self._entries[chosen.cache_key] = chosen
        if len(self._entries) > MAX_CACHE_ENTRIES:
            for key, _ in sorted(self._entries.items(), key=lambda kv: kv[1].created_at)[
                : len(self._entries) - MAX_CACHE_ENTRIES
            ]:
                del self._entries[key]
        self.save()

    def save(self) -> None:
        from tether.agent import files

        doc = {"version": 1, "entries": {k: v.to_json() for k, v in sorted(self._entries.items())}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write_json(self.path, doc)

    def entries(self, *, fingerprint: str | None = None) -> list[selection.Selection]:
        return [s for s in self._entries.values() if fingerprint is None or s.fingerprint == fingerprint]


# ---------------------------------------------------------------- child process


def _limit_memory(memory_mb: int | None) -> None:
    if not memory_mb:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = int(memory_mb) * 1024 * 1024
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _child_main(job_path: str, out_path: str) -> int:
    job = json.loads(pathlib.Path(job_path).read_text())
    _limit_memory(job.get("memory_mb"))
    device_profile = profile_mod.DeviceProfile.from_json(job["profile"])
    if not device_profile.gflops_per_core:
        device_profile = dataclasses.replace(device_profile, gflops_per_core=_gflops_in_process())
    answers: dict[str, Any] = {}
    for doc in job["models"]:
        spec = ModelSpec.from_json(doc)
        try:
            answers[spec.name] = {"selection": select_model(spec, device_profile, budget_s=job["budget_s"]).to_json()}
        except selection.NoUsableCandidate as e:
            answers[spec.name] = {"error": str(e)[:4000]}
    tmp = pathlib.Path(out_path + ".tmp")
    tmp.write_text(json.dumps({"models": answers, "gflops_per_core": device_profile.gflops_per_core}))
    os.replace(tmp, out_path)
    return 0


def _gflops_in_process() -> float:
    a = np.random.default_rng(0).random((128, 128), dtype=np.float32)
    a @ a
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(8):
            a @ a
        best = min(best, (time.perf_counter() - t) / 8)
    return 2 * 128**3 / best / 1e9


async def select_in_child(
    specs: Iterable[ModelSpec],
    device_profile: profile_mod.DeviceProfile,
    *,
    budget_s: float = DEFAULT_BUDGET_S,
    timeout_s: float | None = None,
    memory_mb: int | None = None,
    work_dir: str | os.PathLike[str] | None = None,
) -> dict[str, selection.Selection | str]:
    """Run `select_model` for each spec in a child process; name -> Selection, or the error text.

    Raises TaskFailed when the child crashes or overruns (`timeout_s`, default
    budget x models + 60 s): that says nothing about the model, only that selection could not finish.
    """
    specs = list(specs)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="tether-select-", dir=work_dir))
    try:
        job_path, out_path = tmp / "job.json", tmp / "out.json"
        job_path.write_text(
            json.dumps(
                {
                    "models": [s.to_json() for s in specs],
                    "profile": device_profile.to_json(),
                    "budget_s": budget_s,
                    "memory_mb": memory_mb,
                }
            )
        )
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1")
        with (tmp / "output.log").open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tether.agent.backends",
                str(job_path),
                str(out_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                cwd=str(tmp),
                env=env,
                start_new_session=True,
            )
        limit = timeout_s if timeout_s is not None else budget_s * max(1, len(specs)) + 60.0
        try:
            code = await asyncio.wait_for(proc.wait(), timeout=limit)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.wait())
            if isinstance(sys.exc_info()[1], TimeoutError):
                raise errors.TaskFailed(f"backend selection did not finish within {limit:g}s") from None
            raise
        if code != 0 or not out_path.is_file():
            tail = (tmp / "output.log").read_bytes()[-2000:].decode("utf-8", "replace")
            raise errors.TaskFailed(f"backend selection exited with status {code}\n{tail}".rstrip())
        doc = json.loads(out_path.read_text())
        answers: dict[str, selection.Selection | str] = {}
        for name, answer in (doc.get("models") or {}).items():
            if "selection" in answer:
                answers[name] = selection.Selection.from_json(answer["selection"])
            else:
                answers[name] = str(answer.get("error") or "unknown error")
        return answers
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- what the daemon holds


class Selector:
    """Device profile + cache + at most one selection in flight per model key.

    `select(specs)` answers from the cache or measures in a child process;
    `choices(bundle)` gives the worker's per-model `selection` job entry at
    run time (cache only, no measuring).
    """

    def __init__(
        self,
        *,
        cache_path: str | os.PathLike[str],
        budget_s: float = DEFAULT_BUDGET_S,
        backends: Iterable[str] | None = None,
        memory_mb: int | None = None,
        device_profile: profile_mod.DeviceProfile | None = None,
    ) -> None:
        self.cache = SelectionCache(cache_path)
        self.budget_s = budget_s
        self.memory_mb = memory_mb
        self._backends = None if backends is None else tuple(backends)
        self._profile = device_profile
        self._profile_lock = asyncio.Lock()
        self._inflight: dict[str, asyncio.Future[selection.Selection | str]] = {}

    async def profile(self) -> profile_mod.DeviceProfile:
        async with self._profile_lock:
            if self._profile is None:
                self._profile = await asyncio.to_thread(profile_mod.collect, backends=self._backends, measure=False)
            return self._profile

    @property
    def known_profile(self) -> profile_mod.DeviceProfile | None:
        return self._profile

    async def select(
        self, specs: Iterable[ModelSpec], *, work_dir: str | os.PathLike[str] | None = None
    ) -> dict[str, selection.Selection]:
        """name -> Selection for each spec; ModelUnusable when a model runs on no candidate."""
        p = await self.profile()
        specs = list(specs)
        found: dict[str, selection.Selection] = {}
        todo: list[ModelSpec] = []
        waits: dict[str, asyncio.Future[selection.Selection | str]] = {}
        mine: dict[str, asyncio.Future[selection.Selection | str]] = {}
        for spec in specs:
            cached = self.cache.get(spec.key, p.fingerprint)
            if cached is not None:
                found[spec.name] = cached
            elif spec.key in self._inflight:  # measured by another install (or another agent of a fleet)
                waits[spec.name] = self._inflight[spec.key]
            else:
                todo.append(spec)
                mine[spec.key] = self._inflight[spec.key] = asyncio.get_running_loop().create_future()
                waits[spec.name] = mine[spec.key]
        try:
            if todo:
                answers = await select_in_child(
                    todo, p, budget_s=self.budget_s, memory_mb=self.memory_mb, work_dir=work_dir
                )
                for spec in todo:
                    answer = answers.get(spec.name, "no answer from the selection process")
                    if isinstance(answer, selection.Selection):
                        self.cache.put(answer)
                    mine[spec.key].set_result(answer)
        except BaseException as e:
            for fut in mine.values():
                if not fut.done():
                    fut.set_exception(e if isinstance(e, Exception) else errors.TaskFailed("selection cancelled"))
                    fut.exception()  # retrieved: waiters get it, nobody warns
            raise
        finally:
            for key in mine:
                self._inflight.pop(key, None)
        problems = []
        for name, fut in waits.items():
            answer = await fut
            if isinstance(answer, selection.Selection):
                found[name] = answer
            else:
                problems.append(f"model {name!r} does not run on this device: {answer}")
        if problems:
            raise ModelUnusable("; ".join(problems))
        return found

    def choices(self, bundle: manifest.Manifest) -> dict[str, dict[str, Any]]:
        """The worker's `selection` job entry: model name -> {"candidate", "model"} (cached decisions only)."""
        if self._profile is None:
            return {}
        out = {}
        for spec in specs_for(bundle, path_of=lambda f: f.path):
            chosen = self.cache.get(spec.key, self._profile.fingerprint)
            if chosen is not None and chosen.chosen.engine in spec.relpaths:
                out[spec.name] = {"candidate": chosen.chosen.key, "model": spec.relpaths[chosen.chosen.engine]}
        return out


def load_selected(bundle_dir: str | os.PathLike[str], choice: Mapping[str, Any]) -> Any:
    """In the task worker: load the model file and candidate the selection chose."""
    candidate = selection.Candidate.parse(str(choice["candidate"]))
    rel = manifest.check_relative_path(str(choice["model"]), field="selection.model")
    return load(candidate, pathlib.Path(bundle_dir) / rel)


if __name__ == "__main__":
    code = _child_main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # native thread pools sometimes hang in interpreter teardown
