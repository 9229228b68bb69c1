"""Measuring candidates on the digits MLP (MNN and ONNX Runtime), the selection cache, bad models."""

from __future__ import annotations

import dataclasses
import pathlib
import shutil

import pytest

from tether.agent import backends, profile, selection
from tether.common import manifest

DIGITS = pathlib.Path(__file__).resolve().parents[2] / "examples" / "digits" / "task"
PROFILE = profile.DeviceProfile("x86_64", "test cpu", 2, (), 1000, (), ("mnn/cpu", "onnxruntime/cpu"), {"mnn": "x"})


def digits_spec(root: pathlib.Path = DIGITS, inputs=(1, 64)) -> backends.ModelSpec:
    bundle = manifest.hash_directory(
        root,
        name="digits",
        entrypoint="task.py",
        engines=[manifest.EngineNeeds("mnn", "model.mnn", {"input": tuple(inputs)})],
    )
    (spec,) = backends.specs_for(bundle, path_of=lambda f: root / f.path)
    return spec


def test_specs_find_the_other_format_beside_the_model() -> None:
    spec = digits_spec()
    assert spec.name == "model.mnn" and set(spec.files) == {"mnn", "onnxruntime"}
    assert spec.relpaths == {"mnn": "model.mnn", "onnxruntime": "model.onnx"}
    assert spec.key == selection.model_key(spec.digests, {"input": (1, 64)})


@pytest.mark.parametrize("key", ["mnn/cpu/t1/high", "onnxruntime/cpu/t1/fp32", "mnn/cpu/t2/high"])
def test_measure_each_engine(key) -> None:
    spec = digits_spec()
    c = selection.Candidate.parse(key)
    m = backends.measure(c, spec.files[c.engine], spec.inputs, time_left_s=0.05, max_reps=20)
    assert m.ok and m.latency_ms is not None and 0 < m.latency_ms < 50 and 5 <= m.reps <= 20, m


def test_measure_reports_a_silent_fallback_as_an_error() -> None:
    spec = digits_spec()
    m = backends.measure(
        selection.Candidate("mnn", "opencl", 1, "high"), spec.files["mnn"], spec.inputs, time_left_s=0.05
    )
    assert not m.ok and "asked for mnn/opencl" in m.error and "mnn/cpu" in m.error


def test_select_model_chooses_a_measured_candidate() -> None:
    sel = backends.select_model(digits_spec(), PROFILE, budget_s=0.5)
    measured = {m.candidate.key: m for m in sel.measurements}
    assert sel.chosen.key in measured and sel.latency_ms == measured[sel.chosen.key].latency_ms
    assert {"mnn", "onnxruntime"} <= {k.split("/")[0] for k in measured}
    assert any("fp16" in p.reason for p in sel.pruned)  # "low" on a CPU without fp16
    assert sel.fingerprint == PROFILE.fingerprint and sel.seconds < 5


def test_cache_persists_and_misses_on_a_new_model_or_device(tmp_path) -> None:
    spec = digits_spec()
    sel = backends.select_model(spec, PROFILE, budget_s=0.2)
    cache = backends.SelectionCache(tmp_path / "backends.json")
    cache.put(sel)
    again = backends.SelectionCache(tmp_path / "backends.json")
    assert again.get(spec.key, PROFILE.fingerprint) == sel
    newer_engine = dataclasses.replace(PROFILE, engines={"mnn": "y"})
    assert again.get(spec.key, newer_engine.fingerprint) is None  # device changed: select again
    other_shapes = digits_spec(inputs=(16, 64))
    assert again.get(other_shapes.key, PROFILE.fingerprint) is None  # model (at its shapes) changed
    (tmp_path / "backends.json").write_text("{not json")
    assert backends.SelectionCache(tmp_path / "backends.json").get(spec.key, PROFILE.fingerprint) is None


def _bad_copy(tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "bad"
    shutil.copytree(DIGITS, root)
    (root / "model.mnn").write_bytes(b"not a model" * 100)
    (root / "model.onnx").write_bytes(b"not a model either" * 100)
    return root


async def test_selector_refuses_a_model_that_loads_nowhere(tmp_path) -> None:
    selector = backends.Selector(cache_path=tmp_path / "cache.json", device_profile=PROFILE, budget_s=0.2)
    with pytest.raises(backends.ModelUnusable) as info:
        await selector.select([digits_spec(_bad_copy(tmp_path))], work_dir=tmp_path)
    message = str(info.value)
    assert "model.mnn" in message and "MNN cannot load model" in message and "onnxruntime cannot load" in message
    assert not (tmp_path / "cache.json").exists()  # nothing cached for a bad model
    assert not list(tmp_path.glob("tether-select-*"))  # the child's scratch space is gone


async def test_selector_refuses_declared_shapes_the_model_does_not_take(tmp_path) -> None:
    selector = backends.Selector(cache_path=tmp_path / "cache.json", device_profile=PROFILE, budget_s=0.2)
    with pytest.raises(backends.ModelUnusable, match=r"does not accept input shapes|Got invalid dimensions"):
        await selector.select([digits_spec(inputs=(1, 65))], work_dir=tmp_path)


async def test_selector_measures_once_then_answers_from_the_cache(tmp_path) -> None:
    selector = backends.Selector(cache_path=tmp_path / "cache.json", device_profile=PROFILE, budget_s=0.2)
    spec = digits_spec()
    first = await selector.select([spec, spec], work_dir=tmp_path)
    assert list(first) == ["model.mnn"]
    selector2 = backends.Selector(cache_path=tmp_path / "cache.json", device_profile=PROFILE)
    second = await selector2.select([spec])  # a restarted agent: cache hit, no child process
    assert second["model.mnn"] == first["model.mnn"]
    bundle = manifest.hash_directory(
        DIGITS, name="d", entrypoint="task.py", engines=[manifest.EngineNeeds("mnn", "model.mnn", {"input": (1, 64)})]
    )
    choice = selector2.choices(bundle)["model.mnn"]
    assert choice["candidate"] == first["model.mnn"].chosen.key
    model = backends.load_selected(DIGITS, choice)
    assert model.backend == first["model.mnn"].chosen.backend_name
