"""ONNX → MNN conversion through MNN's converter entry point (`tether model convert`).

MNN's Python converter lives in `MNN.tools`, which installs packages and
phones home when imported, and the `mnnconvert` console script wraps it. Tether
uses neither: it calls the converter's C extension, `_tools.mnnconvert`,
which ships in the same `mnn` wheel, in a child process (the converter prints
freely and can abort on malformed input).

The converter answers True even when it failed, so success is judged by what
it wrote: the output must exist, load in MNN, and (with `verify`) compute what
ONNX Runtime computes on inputs of the right dtype and meaning
(`tether.agent.crosscheck`: the model's sample inputs `<stem>.inputs.npz` or
`samples=`, else generated ones: masks of ones then padded, ids within the
vocabulary), within `modelinputs.TOLERANCE_FP32` (`TOLERANCE_FP16` with
`--fp16`) of the output scale. The converter also stamps a random
UUID into every model; it is replaced by one derived from the ONNX bytes, so
converting the same file twice gives the same bytes (and bundle digest).

Nothing is left behind on failure: the model is written to a temporary file
next to the output and renamed into place only once it passed every check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Mapping

from tether.agent import crosscheck, modelinputs
from tether.common import errors

_CONVERT_SNIPPET = """
import sys
import _tools  # the MNN converter's C extension (never `MNN.tools`)
ok = _tools.mnnconvert(sys.argv[1:])
sys.stdout.flush()
raise SystemExit(0 if ok else 1)
"""


class ConversionFailed(errors.InvalidArgument):
    """The model could not be converted; `log` holds the converter's output."""

    def __init__(self, message: str, *, log: str = "") -> None:
        super().__init__(message)
        self.log = log


@dataclasses.dataclass(frozen=True)
class Conversion:
    output: pathlib.Path
    size: int
    sha256: str
    fp16: bool
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    max_abs_diff: float | None  # against ONNX Runtime; None when not verified
    checked_on: str = ""  # "3 generated inputs", "4 shipped inputs"; "" when not verified
    tolerance: float | None = None


def _converter_error(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if "error" in ln.lower() or "failed" in ln.lower()]
    return "; ".join(dict.fromkeys(lines))[:500] or "the converter wrote no model"


def pin_uuid(mnn_path: pathlib.Path, *, seed: bytes) -> None:
    """Replace the converter's random model UUID by one derived from `seed` (same length, in place)."""
    import MNN

    old = MNN.get_model_uuid(str(mnn_path)).encode("ascii")
    if not old:
        return
    new = str(uuid.UUID(bytes=hashlib.sha256(seed).digest()[:16], version=4)).encode("ascii")
    data = mnn_path.read_bytes()
    if len(old) != len(new) or data.count(old) != 1:
        raise ConversionFailed(f"cannot pin the model uuid (found {data.count(old)} copies)")
    mnn_path.write_bytes(data.replace(old, new))


def convert(
    onnx_path: str | os.PathLike[str],
    mnn_path: str | os.PathLike[str],
    *,
    fp16: bool = False,
    verify: bool = True,
    samples: str | os.PathLike[str] | None = None,
    int_bounds: Mapping[str, tuple[int, int]] | None = None,
    timeout_s: float = 600.0,
) -> Conversion:
    """Convert `onnx_path` to `mnn_path`; ConversionFailed (and no output file) when anything is wrong.

    `samples`: an `.npz` of sample inputs (default: `<stem>.inputs.npz` beside the ONNX file, if there is
    one); `int_bounds`: input name -> [low, high) for generated integer inputs.
    """
    src = pathlib.Path(onnx_path)
    dst = pathlib.Path(mnn_path)
    if not src.is_file():
        raise ConversionFailed(f"{src}: no such file")
    if dst.resolve() == src.resolve():
        raise ConversionFailed("the output would overwrite the input")
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    tmp.unlink()  # the converter creates it; an empty file would hide a failure
    try:
        args = ["mnnconvert", "-f", "ONNX", "--modelFile", str(src), "--MNNModel", str(tmp), "--bizCode", "tether"]
        if fp16:
            args.append("--fp16")
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _CONVERT_SNIPPET, *args],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ConversionFailed(f"{src.name}: the converter did not finish within {timeout_s:g}s") from None
        log = (proc.stdout or "") + (proc.stderr or "")
        if proc.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0 or "Converted Success" not in log:
            raise ConversionFailed(f"{src.name} could not be converted to MNN: {_converter_error(log)}", log=log)
        pin_uuid(tmp, seed=src.read_bytes())
        if samples is None and (beside := modelinputs.samples_path_for(src)).is_file():
            samples = beside
        elif samples is not None and not pathlib.Path(samples).is_file():
            raise ConversionFailed(f"--inputs: {samples}: no such file")
        inputs, outputs, checked = _check(src, tmp, verify=verify, fp16=fp16, samples=samples, int_bounds=int_bounds)
        os.replace(tmp, dst)
        data = dst.read_bytes()
        return Conversion(
            output=dst,
            size=len(data),
            sha256="sha256:" + hashlib.sha256(data).hexdigest(),
            fp16=fp16,
            inputs=inputs,
            outputs=outputs,
            max_abs_diff=None if checked is None else checked.max_abs_diff,
            checked_on="" if checked is None else f"{checked.samples} {checked.source} inputs",
            tolerance=None if checked is None else checked.tolerance,
        )
    finally:
        tmp.unlink(missing_ok=True)


def _check(
    src: pathlib.Path,
    mnn_file: pathlib.Path,
    *,
    verify: bool,
    fp16: bool,
    samples: str | os.PathLike[str] | None,
    int_bounds: Mapping[str, tuple[int, int]] | None,
) -> tuple[tuple[str, ...], tuple[str, ...], crosscheck.Checked | None]:
    """The converted model loads in MNN and (with `verify`) agrees with ONNX Runtime (`crosscheck.check`)."""
    from tether.agent import backends, selection

    try:
        mnn_model = backends.load(selection.Candidate("mnn", "cpu", 1, "high"), mnn_file)
    except errors.TetherError as e:
        raise ConversionFailed(f"the converted model does not load in MNN: {e}") from None
    names = (tuple(mnn_model.input_names), tuple(mnn_model.output_names))
    if not verify:
        return (*names, None)
    tolerance = modelinputs.TOLERANCE_FP16 if fp16 else modelinputs.TOLERANCE_FP32
    try:
        checked = crosscheck.check(src, mnn_file, tolerance=tolerance, samples=samples, int_bounds=int_bounds)
    except errors.FailedPrecondition:  # onnxruntime not installed: loading is all we can check
        return (*names, None)
    except (modelinputs.Mismatch, crosscheck.Inconclusive) as e:
        raise ConversionFailed(f"the converted model does not compute what {src.name} computes: {e}") from None
    except errors.TetherError as e:
        raise ConversionFailed(f"the converted model does not run like the original: {e}") from None
    return (*names, checked)
