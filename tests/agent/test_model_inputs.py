"""Models whose inputs are not float: inputs of the right dtype and meaning, verification that catches a wrong
conversion, the agent's cross-check before selection, and the runtime benchmark on any model folder."""

from __future__ import annotations

import io
import pathlib
import shutil

import numpy as np
import pytest

from tether.agent import backends, convert, crosscheck, engine, modelinputs, profile, selection
from tether.common import errors, manifest

MODELS = pathlib.Path(__file__).resolve().parents[2] / "bench" / "models"
ENCODER_ONNX, ENCODER_MNN = MODELS / "encoder.onnx", MODELS / "encoder.mnn"
PROFILE = profile.DeviceProfile("x86_64", "test cpu", 2, (), 1000, (), ("mnn/cpu", "onnxruntime/cpu"), {"mnn": "x"})
SPECS = [
    modelinputs.InputSpec("input_ids", (1, 32), np.dtype(np.int64)),
    modelinputs.InputSpec("attention_mask", (1, 32), np.dtype(np.int64)),
    modelinputs.InputSpec("token_type_ids", (1, 32), np.dtype(np.int32)),
    modelinputs.InputSpec("pixels", (1, 3), np.dtype(np.float32)),
    modelinputs.InputSpec("valid", (1, 4), np.dtype(np.bool_)),
]


def corrupt(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    """A wrong conversion: the token embedding table's rows past 1 stored with their features reversed."""
    import onnx
    from onnx import numpy_helper

    table = next(
        numpy_helper.to_array(t) for t in onnx.load(str(ENCODER_ONNX)).graph.initializer if t.name == "embed.tokens"
    )
    data = src.read_bytes()
    at = data.find(table.tobytes())
    assert at > 0, "the table is stored as is in the MNN file"
    bad = table.copy()
    bad[2:] = bad[2:, ::-1]
    dst.write_bytes(data[:at] + bad.tobytes() + data[at + bad.nbytes :])
    return dst


# ---------------------------------------------------------------- generated and shipped inputs


def test_generated_inputs_have_the_dtype_and_meaning_of_each_input() -> None:
    samples = modelinputs.generate(SPECS, count=3, int_bounds={"input_ids": (0, 1000)})
    assert all(s[n.name].dtype == n.dtype and s[n.name].shape == n.shape for s in samples for n in SPECS)
    first, later = samples[0], samples[2]
    assert first["attention_mask"].all() and first["valid"].all()  # masks of ones
    assert 0 < later["attention_mask"].sum() < 32 and not later["attention_mask"][0, -1]  # then padded at the end
    ids = np.concatenate([s["input_ids"] for s in samples])
    assert ids.min() >= 0 and ids.max() < 1000 and len(np.unique(ids)) > 50  # within the vocabulary, varied
    assert set(np.unique(first["token_type_ids"])) == {0} and set(np.unique(later["token_type_ids"])) == {0, 1}
    assert first["pixels"].dtype == np.float32 and first["pixels"].std() > 0
    unbounded = modelinputs.generate(SPECS[:1])[0]["input_ids"]
    assert set(np.unique(unbounded)) <= {0, 1}  # no vocabulary known: ids every table has
    again = modelinputs.generate(SPECS, count=3, int_bounds={"input_ids": (0, 1000)})
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(samples, again, strict=True) for k in a)  # deterministic


def test_the_vocabulary_bound_is_read_from_the_onnx_model() -> None:
    assert modelinputs.onnx_int_bounds(ENCODER_ONNX) == {"input_ids": (0, 1000)}
    assert modelinputs.onnx_int_bounds(MODELS / "mlp.onnx") == {}


def _npz(path: pathlib.Path, **arrays: np.ndarray) -> pathlib.Path:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    path.write_bytes(buf.getvalue())
    return path


def test_shipped_samples_are_loaded_and_cast_to_the_engines_dtype(tmp_path) -> None:
    specs = SPECS[:2]
    ids = np.arange(64, dtype=np.int64).reshape(2, 1, 32)
    path = _npz(tmp_path / "m.inputs.npz", input_ids=ids, attention_mask=np.ones((2, 1, 32), np.int32))
    samples = modelinputs.load_samples(path, specs)
    assert len(samples) == 2 and samples[1]["input_ids"][0, 0] == 32
    assert samples[0]["attention_mask"].dtype == np.int64  # cast to the input's type
    one = _npz(tmp_path / "one.npz", input_ids=ids[0], attention_mask=np.ones((1, 32), np.int64))
    assert len(modelinputs.load_samples(one, specs)) == 1  # the input's own shape: one sample
    mnn_specs = [dataclasses_replace(s, dtype=np.dtype(np.int32)) for s in specs]
    assert modelinputs.feed(samples[0], mnn_specs)["input_ids"].dtype == np.int32


def dataclasses_replace(spec: modelinputs.InputSpec, **kw) -> modelinputs.InputSpec:
    import dataclasses

    return dataclasses.replace(spec, **kw)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"input_ids": np.zeros((1, 32), np.int64)}, "no array for inputs ['attention_mask']"),
        ({"input_ids": np.zeros((1, 32)), "attention_mask": np.ones((1, 32))}, "input_ids: float values"),
        ({"input_ids": np.zeros((1, 31), np.int64), "attention_mask": np.ones((1, 31))}, "input_ids: shape (1, 1, 31)"),
        (
            {"input_ids": np.zeros((1, 32), np.int64), "attention_mask": np.ones((1, 32)), "x": np.ones(1)},
            "arrays ['x'] are not inputs",
        ),
        (
            {"input_ids": np.zeros((2, 1, 32), np.int64), "attention_mask": np.ones((3, 1, 32), np.int64)},
            "attention_mask: 3 samples, other inputs have 2",
        ),
    ],
)
def test_bad_sample_files_are_refused_naming_the_input(tmp_path, arrays, message) -> None:
    path = _npz(tmp_path / "m.inputs.npz", **arrays)
    with pytest.raises(modelinputs.SampleError) as e:
        modelinputs.load_samples(path, SPECS[:2])
    assert message in str(e.value) and "m.inputs.npz" in str(e.value)


def test_pickled_arrays_and_non_archives_are_refused(tmp_path) -> None:
    buf = io.BytesIO()
    np.savez(buf, input_ids=np.array([{"a": 1}], dtype=object), attention_mask=np.ones((1, 32)))
    (tmp_path / "p.npz").write_bytes(buf.getvalue())
    with pytest.raises(modelinputs.SampleError, match="without pickle"):
        modelinputs.load_samples(tmp_path / "p.npz", SPECS[:2])
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(modelinputs.SampleError, match=r"not a readable \.npz"):
        modelinputs.load_samples(tmp_path / "junk.npz", SPECS[:2])


def test_compare_states_the_tolerance_and_names_the_output() -> None:
    ref = {"logits": np.array([[0.5, -2.0]], np.float32)}
    assert modelinputs.compare(ref, {"logits": ref["logits"] + 1e-4}, tolerance=1e-3) == pytest.approx(1e-4, rel=1e-2)
    with pytest.raises(modelinputs.Mismatch, match=r"'logits' differs .* up to 0.01 .*tolerance 0.001 x max"):
        modelinputs.compare(ref, {"logits": ref["logits"] + 0.01}, tolerance=1e-3)
    with pytest.raises(modelinputs.Mismatch, match="no output 'logits'"):
        modelinputs.compare(ref, {"other": ref["logits"]}, tolerance=1e-3)
    with pytest.raises(modelinputs.Mismatch, match="non-finite"):
        modelinputs.compare(ref, {"logits": np.array([[np.nan, -2.0]], np.float32)}, tolerance=1e-3)


# ---------------------------------------------------------------- verification catches a wrong conversion


def test_the_engines_report_integer_input_types() -> None:
    ort = engine.OnnxRuntimeEngine().load(str(ENCODER_ONNX))
    mnn = engine.MNNEngine().load(str(ENCODER_MNN))
    assert ort.input_types == {"input_ids": np.int64, "attention_mask": np.int64}
    assert mnn.input_types == {"input_ids": np.int32, "attention_mask": np.int32}  # MNN keeps ids as int32


def test_the_committed_encoder_agrees_on_shipped_and_generated_inputs() -> None:
    shipped = crosscheck.check(ENCODER_ONNX, ENCODER_MNN, tolerance=1e-3, samples=MODELS / "encoder.inputs.npz")
    assert shipped.source == "shipped" and shipped.samples == 4 and shipped.max_abs_diff < 1e-4
    generated = crosscheck.check(ENCODER_ONNX, ENCODER_MNN, tolerance=1e-3)
    assert generated.source == "generated" and generated.samples == modelinputs.GENERATED_SAMPLES


def test_a_wrong_conversion_passes_zeros_but_not_realistic_inputs(tmp_path) -> None:
    bad = corrupt(ENCODER_MNN, tmp_path / "encoder.mnn")
    # What verification used to do: all-zero inputs. The corrupted rows are never read, so both agree.
    ort, mnn = engine.OnnxRuntimeEngine().load(str(ENCODER_ONNX)), engine.MNNEngine().load(str(bad))
    zeros = {"input_ids": np.zeros((1, 32), np.int64), "attention_mask": np.zeros((1, 32), np.int64)}
    want = ort.run(zeros)
    got = mnn.run({k: v.astype(np.int32) for k, v in zeros.items()})
    assert modelinputs.compare(want, got, tolerance=1e-3) < 1e-3
    assert not np.any(want["logits"])  # an all-zero mask: the pooled output is exactly zero
    # Realistic inputs (ids within the vocabulary read from the model, masks of ones): caught, loudly.
    with pytest.raises(modelinputs.Mismatch, match="differs from the reference"):
        crosscheck.check(ENCODER_ONNX, bad, tolerance=1e-3)
    with pytest.raises(convert.ConversionFailed, match=r"does not compute what encoder.onnx computes.*tolerance"):
        convert._check(ENCODER_ONNX, bad, verify=True, fp16=False, samples=None, int_bounds=None)


def test_inputs_that_prove_nothing_are_inconclusive(tmp_path) -> None:
    zeros = _npz(tmp_path / "z.npz", input_ids=np.zeros((1, 32), np.int64), attention_mask=np.zeros((1, 32), np.int64))
    only_logits = tmp_path / "logits.onnx"
    import onnx

    model = onnx.load(str(ENCODER_ONNX))
    keep = [o for o in model.graph.output if o.name == "logits"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    only_logits.write_bytes(model.SerializeToString())
    mnn = tmp_path / "logits.mnn"
    convert.convert(only_logits, mnn)
    with pytest.raises(crosscheck.Inconclusive, match="every output is zero"):
        crosscheck.check(only_logits, mnn, tolerance=1e-3, samples=zeros)


def test_convert_cli_verifies_on_realistic_inputs_and_states_the_tolerance(tmp_path) -> None:
    from click.testing import CliRunner

    from tether.cli.main import cli

    src = tmp_path / "encoder.onnx"
    shutil.copyfile(ENCODER_ONNX, src)
    result = CliRunner().invoke(
        cli, ["model", "convert", str(src), str(tmp_path / "e.mnn"), "--int-range", "input_ids=0:1000"]
    )
    assert result.exit_code == 0, result.output
    assert "on 3 generated inputs (tolerance 0.001 of the output scale)" in result.output
    shutil.copyfile(MODELS / "encoder.inputs.npz", tmp_path / "encoder.inputs.npz")
    result = CliRunner().invoke(cli, ["model", "convert", str(src), str(tmp_path / "f.mnn")])
    assert result.exit_code == 0 and "on 4 shipped inputs" in result.output, result.output
    bad = CliRunner().invoke(cli, ["model", "convert", str(src), str(tmp_path / "g.mnn"), "--int-range", "ids=5"])
    assert bad.exit_code != 0 and "NAME=LOW:HIGH" in bad.output and not (tmp_path / "g.mnn").exists()


# ---------------------------------------------------------------- the agent: selection and its cross-check


def encoder_spec(root: pathlib.Path) -> backends.ModelSpec:
    bundle = manifest.hash_directory(
        root,
        name="encoder",
        entrypoint="task.py",
        engines=[manifest.EngineNeeds("mnn", "model.mnn", {"input_ids": (1, 32), "attention_mask": (1, 32)})],
    )
    (spec,) = backends.specs_for(bundle, path_of=lambda f: root / f.path)
    return spec


def _bundle(root: pathlib.Path, mnn: pathlib.Path, *, samples: bool) -> pathlib.Path:
    root.mkdir()
    (root / "task.py").write_text("def run(ctx):\n    return {}\n")
    shutil.copyfile(mnn, root / "model.mnn")
    shutil.copyfile(ENCODER_ONNX, root / "model.onnx")
    if samples:
        shutil.copyfile(MODELS / "encoder.inputs.npz", root / "model.inputs.npz")
    return root


def test_selection_measures_mnn_on_integer_inputs_with_shipped_samples(tmp_path) -> None:
    spec = encoder_spec(_bundle(tmp_path / "b", ENCODER_MNN, samples=True))
    assert spec.samples and spec.samples.endswith("model.inputs.npz") and spec.samples_digest.startswith("sha256:")
    assert spec.key != encoder_spec(_bundle(tmp_path / "c", ENCODER_MNN, samples=False)).key
    sel = backends.select_model(spec, PROFILE, budget_s=1.0)
    mnn = [m for m in sel.measurements if m.candidate.engine == "mnn"]
    assert mnn and all(m.ok for m in mnn), [m.error for m in mnn]  # MNN measured, not refused
    assert not any("disagrees" in p.reason for p in sel.pruned)


def test_the_agent_refuses_to_select_a_converted_model_that_disagrees_with_its_source(tmp_path) -> None:
    root = _bundle(tmp_path / "b", ENCODER_MNN, samples=False)
    corrupt(ENCODER_MNN, root / "model.mnn")
    spec = encoder_spec(root)
    assert "disagrees with model.onnx" in backends.cross_check(spec)
    sel = backends.select_model(spec, PROFILE, budget_s=1.0)
    assert sel.chosen.engine == "onnxruntime"
    assert all(m.candidate.engine == "onnxruntime" for m in sel.measurements)
    refused = [p for p in sel.pruned if p.candidate.engine == "mnn"]
    assert refused and all("disagrees with model.onnx" in p.reason and "tolerance" in p.reason for p in refused)


def test_an_mnn_only_bundle_with_integer_inputs_is_measured_not_refused(tmp_path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    (root / "task.py").write_text("def run(ctx):\n    return {}\n")
    shutil.copyfile(ENCODER_MNN, root / "model.mnn")
    spec = encoder_spec(root)
    assert set(spec.files) == {"mnn"} and backends.cross_check(spec) == ""
    m = backends.measure(selection.Candidate.parse("mnn/cpu/t1/high"), spec.files["mnn"], spec.inputs, time_left_s=0.2)
    assert m.ok, m.error


def test_the_runtime_bench_loads_any_model_folder(tmp_path) -> None:
    from tether.devtools import bench_runtime

    shutil.copyfile(ENCODER_ONNX, tmp_path / "enc.onnx")
    shutil.copyfile(ENCODER_MNN, tmp_path / "enc.mnn")
    shutil.copyfile(MODELS / "encoder.inputs.npz", tmp_path / "enc.inputs.npz")
    shutil.copyfile(MODELS / "mlp.onnx", tmp_path / "solo.onnx")
    found = {m.name: m for m in bench_runtime.load_models(tmp_path, None)}
    assert set(found) == {"enc", "solo"}
    assert set(found["enc"].spec.files) == {"mnn", "onnxruntime"} and found["enc"].spec.samples
    assert set(found["solo"].spec.files) == {"onnxruntime"}
    with pytest.raises(Exception, match="unknown models"):
        bench_runtime.load_models(tmp_path, ["nope"])
    assert {m.name for m in bench_runtime.load_models(MODELS, None)} >= set(bench_runtime.MODELS)


def test_unusable_models_are_errors_not_crashes(tmp_path) -> None:
    with pytest.raises(errors.InvalidArgument):
        crosscheck.check(tmp_path / "missing.onnx", ENCODER_MNN, tolerance=1e-3)
