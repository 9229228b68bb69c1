"""Does a converted MNN model compute what its ONNX source computes? On inputs of the right dtype and meaning.

Used twice: by `tether model convert` after conversion (`tether.agent.convert`),
and by the agent before it selects a backend for a bundle that ships both
formats (`backends.select_model`): MNN's converter has been seen to write a
different, wrong model from byte-identical ONNX in another environment (a
folded constant read from uninitialised memory), so a device does not trust
a conversion it did not check itself.

Both models run on the CPU, one thread, MNN at high precision, on the
bundle's sample inputs (`<stem>.inputs.npz`) or, without them, on
`modelinputs.GENERATED_SAMPLES` generated inputs (`tether.agent.modelinputs`:
masks of ones then padded, ids within the vocabulary). Every output of every
sample must agree within the stated tolerance (`modelinputs.compare`), else
`modelinputs.Mismatch` names the output, the error and the limit. Inputs on
which every output is exactly zero cannot tell two models apart: `Inconclusive`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from tether.agent import engine, modelinputs
from tether.common import errors


class Inconclusive(errors.VerificationFailed):
    """Every output is zero on the inputs used: they prove nothing about the conversion."""


@dataclasses.dataclass(frozen=True)
class Checked:
    max_abs_diff: float
    samples: int
    source: str  # "shipped" (the bundle's sample inputs) or "generated"
    tolerance: float


def check(
    onnx_path: str | os.PathLike[str],
    mnn_path: str | os.PathLike[str],
    *,
    tolerance: float,
    shapes: Mapping[str, Sequence[int]] | None = None,
    samples: str | os.PathLike[str] | None = None,
    int_bounds: Mapping[str, tuple[int, int]] | None = None,
) -> Checked:
    """Run both models on the same inputs; Mismatch / Inconclusive / InvalidArgument (a model that will not load).

    FailedPrecondition when ONNX Runtime is not installed (nothing to compare against).
    """
    ort_model: Any = engine.OnnxRuntimeEngine().load(str(onnx_path), backend="cpu", threads=1)
    mnn_model: Any = engine.MNNEngine(precision="high").load(str(mnn_path), backend="cpu", threads=1)
    ort_specs = modelinputs.describe(ort_model, shapes)
    mnn_specs = {s.name: s for s in modelinputs.describe(mnn_model, shapes)}
    if set(mnn_specs) != {s.name for s in ort_specs}:
        raise modelinputs.Mismatch(f"inputs differ: MNN takes {sorted(mnn_specs)}, ONNX {[s.name for s in ort_specs]}")
    bounds = {**modelinputs.onnx_int_bounds(onnx_path), **dict(int_bounds or {})}
    shipped = samples is not None and os.path.isfile(samples)
    inputs = modelinputs.for_model(ort_specs, samples=samples if shipped else None, int_bounds=bounds)
    wants = []
    worst = 0.0
    for i, sample in enumerate(inputs):
        mnn_in = {
            n: modelinputs.cast(n, a, mnn_specs[n].dtype, source=f"sample {i}") for n, a in sample.items()
        }  # the same values in MNN's element types (ONNX int64 ids are int32 in MNN)
        mnn_model.resize({n: a.shape for n, a in mnn_in.items()})
        want = ort_model.run(sample)
        got = mnn_model.run(mnn_in)
        worst = max(worst, modelinputs.compare(want, got, tolerance=tolerance, what=f"sample {i}: "))
        wants.append(want)
    if modelinputs.all_zero(wants):
        raise Inconclusive(
            f"every output is zero on the {len(inputs)} {'shipped' if shipped else 'generated'} inputs: "
            f"they cannot tell a wrong conversion; ship sample inputs ({modelinputs.SAMPLES_SUFFIX})"
        )
    return Checked(worst, len(inputs), "shipped" if shipped else "generated", tolerance)
