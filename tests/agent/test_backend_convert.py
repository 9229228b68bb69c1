"""`tether model convert`: ONNX -> MNN through `_tools.mnnconvert` (real converter), bad input leaves nothing."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from click.testing import CliRunner

from tether.agent import convert
from tether.cli.main import cli

onnx = pytest.importorskip("onnx")


def tiny_onnx(path: pathlib.Path) -> pathlib.Path:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def test_convert_cli_writes_a_verified_reproducible_model(tmp_path) -> None:
    src = tiny_onnx(tmp_path / "tiny.onnx")
    result = CliRunner().invoke(cli, ["model", "convert", str(src), str(tmp_path / "out/tiny.mnn"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output.strip().splitlines()[-1])
    assert doc["inputs"] == ["x"] and doc["outputs"] == ["y"] and doc["max_abs_diff"] < 1e-4
    first = (tmp_path / "out/tiny.mnn").read_bytes()
    again = convert.convert(src, tmp_path / "again.mnn")
    assert again.output.read_bytes() == first and again.sha256 == doc["sha256"]  # UUID pinned: same bytes
    half = convert.convert(src, tmp_path / "half.mnn", fp16=True)
    assert half.fp16 and half.max_abs_diff is not None and half.max_abs_diff < 1e-2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.mnn", "half.mnn", "out", "tiny.onnx"]


def test_corrupt_onnx_is_a_clear_error_and_leaves_nothing(tmp_path) -> None:
    good = tiny_onnx(tmp_path / "tiny.onnx").read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(good[: len(good) // 2])
    result = CliRunner().invoke(cli, ["model", "convert", str(bad), str(tmp_path / "bad.mnn")])
    assert result.exit_code == 1
    assert "bad.onnx could not be converted to MNN" in result.output and "not onnx model" in result.output.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "tiny.onnx"]  # no output, no temporary


def test_missing_input_and_self_overwrite(tmp_path) -> None:
    with pytest.raises(convert.ConversionFailed, match="no such file"):
        convert.convert(tmp_path / "nope.onnx", tmp_path / "x.mnn")
    src = tiny_onnx(tmp_path / "tiny.onnx")
    with pytest.raises(convert.ConversionFailed, match="overwrite"):
        convert.convert(src, src)
