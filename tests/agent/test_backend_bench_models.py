"""The runtime benchmark's committed models match their index and load on both engines."""

from __future__ import annotations

import hashlib
import json
import pathlib

import pytest

from tether.agent import backends, selection

MODELS = pathlib.Path(__file__).resolve().parents[2] / "bench" / "models"
INDEX = json.loads((MODELS / "models.json").read_text())


@pytest.mark.parametrize("name", ["mlp", "cnn", "efficientnet_lite0", "encoder"])
def test_committed_model_files_match_the_index(name) -> None:
    info = INDEX[name]
    for fmt in ("onnx", "mnn"):
        data = (MODELS / info[fmt]["file"]).read_bytes()
        assert len(data) == info[fmt]["size"] <= 25 * 1024 * 1024
        assert "sha256:" + hashlib.sha256(data).hexdigest() == info[fmt]["sha256"]


@pytest.mark.parametrize("name", ["mlp", "cnn", "encoder"])
def test_small_bench_models_run_alike_on_both_engines(name) -> None:
    import numpy as np

    shapes = {k: tuple(v) for k, v in INDEX[name]["inputs"].items()}
    outs = []
    for key, fmt in (("mnn/cpu/t1/high", "mnn"), ("onnxruntime/cpu/t1/fp32", "onnx")):
        model = backends.load(selection.Candidate.parse(key), MODELS / INDEX[name][fmt]["file"])
        if hasattr(model, "resize"):
            model.resize(shapes)
        outs.append(model.run(backends.input_arrays(model, shapes, seed=1)))
    mnn, ort = outs
    assert set(mnn) == set(ort)
    for out in ort:
        np.testing.assert_allclose(mnn[out], ort[out], atol=1e-5)
