"""`tether model`: model tooling. `tether model convert IN.onnx OUT.mnn [--fp16]`.

Conversion runs MNN's converter entry point (`_tools.mnnconvert`) in a child
process, never `MNN.tools` or the `mnnconvert` script; see
`tether.agent.convert`. The output appears only when it loads in MNN and
(unless `--no-verify`) matches ONNX Runtime on a random input.
"""

from __future__ import annotations

import json
import pathlib

import click


@click.group()
def model() -> None:
    """Convert models between engine formats."""


@model.command()
@click.argument("onnx_file", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.argument("mnn_file", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("--fp16", is_flag=True, help="Store weights as fp16 (half the size; computes in fp32 where no fp16).")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Compare with ONNX Runtime on one input.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def convert(onnx_file: pathlib.Path, mnn_file: pathlib.Path, fp16: bool, verify: bool, as_json: bool) -> None:
    """Convert ONNX_FILE to MNN_FILE (nothing is written when it fails)."""
    from tether.agent import convert as convert_mod

    try:
        result = convert_mod.convert(onnx_file, mnn_file, fp16=fp16, verify=verify)
    except convert_mod.ConversionFailed as e:
        raise click.ClickException(str(e)) from None
    doc = {
        "output": str(result.output),
        "size": result.size,
        "sha256": result.sha256,
        "fp16": result.fp16,
        "inputs": list(result.inputs),
        "outputs": list(result.outputs),
        "max_abs_diff": result.max_abs_diff,
    }
    if as_json:
        click.echo(json.dumps(doc))
        return
    check = "not verified" if result.max_abs_diff is None else f"max |mnn - onnxruntime| = {result.max_abs_diff:.3g}"
    click.echo(f"wrote {result.output} ({result.size} bytes, {result.sha256[:19]}…); {check}")
