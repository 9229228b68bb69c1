"""`tether model`: model tooling. `tether model convert IN.onnx OUT.mnn [--fp16]`.

Conversion runs MNN's converter entry point (`_tools.mnnconvert`) in a child
process, never `MNN.tools` or the `mnnconvert` script; see
`tether.agent.convert`. The output appears only when it loads in MNN and
(unless `--no-verify`) matches ONNX Runtime on inputs of the right dtype and
meaning: `--inputs FILE.npz` (or `<stem>.inputs.npz` beside the ONNX file),
else generated per dtype and input name (`tether.agent.modelinputs`), within
a stated tolerance (1e-3, 2e-2 with `--fp16`, of the output scale).
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
@click.option(
    "--verify/--no-verify", default=True, show_default=True, help="Compare with ONNX Runtime on realistic inputs."
)
@click.option(
    "--inputs",
    "samples",
    type=click.Path(dir_okay=False, exists=True, path_type=pathlib.Path),
    default=None,
    help="Sample inputs (.npz, one array per input; default: <stem>.inputs.npz beside ONNX_FILE if present).",
)
@click.option(
    "--int-range",
    "int_ranges",
    multiple=True,
    metavar="NAME=LOW:HIGH",
    help="Generated values of integer input NAME in [LOW, HIGH) (e.g. a vocabulary); repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def convert(
    onnx_file: pathlib.Path,
    mnn_file: pathlib.Path,
    fp16: bool,
    verify: bool,
    samples: pathlib.Path | None,
    int_ranges: tuple[str, ...],
    as_json: bool,
) -> None:
    """Convert ONNX_FILE to MNN_FILE (nothing is written when it fails)."""
    from tether.agent import convert as convert_mod

    bounds = _int_ranges(int_ranges)
    try:
        result = convert_mod.convert(onnx_file, mnn_file, fp16=fp16, verify=verify, samples=samples, int_bounds=bounds)
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
        "checked_on": result.checked_on,
        "tolerance": result.tolerance,
    }
    if as_json:
        click.echo(json.dumps(doc))
        return
    check = (
        "not verified"
        if result.max_abs_diff is None
        else f"max |mnn - onnxruntime| = {result.max_abs_diff:.3g} on {result.checked_on} "
        f"(tolerance {result.tolerance:g} of the output scale)"
    )
    click.echo(f"wrote {result.output} ({result.size} bytes, {result.sha256[:19]}…); {check}")


def _int_ranges(values: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    out = {}
    for v in values:
        name, sep, rng = v.partition("=")
        low, sep2, high = rng.partition(":")
        try:
            bounds = (int(low), int(high))
        except ValueError:
            bounds = (0, 0)
        if not (sep and sep2 and name) or bounds[0] >= bounds[1]:
            raise click.BadParameter(f"{v!r}: expected NAME=LOW:HIGH with LOW < HIGH", param_hint="--int-range")
        out[name] = bounds
    return out
