"""Build the `digits-fl` example bundle's data files (build-time only; not imported by the agent).

Writes, deterministically (the same inputs give byte-identical files):

- task/model.safetensors: the round-0 global model (`spec.federated.modelFile`'s default), `fltrain.initial_weights(0)`
  (Glorot-uniform, seed 0), float32, named `fc1.weight` ... `fc2.bias`;
- task/cloud/heldout.npz: the stratified 20 % held-out test set (X float32,
  y int64) that the cloud scores every round's global model on
  (`spec.federated.evaluation.server.file`).

The devices' data is the Dirichlet(0.5) split of the other 80 %
(`tether.devtools.fldata.digits_split()`), computed where it is needed
(simulated fleets, `tether bench fl`) rather than shipped.

Usage: python examples/digits-fl/build.py [--check]
"""

from __future__ import annotations

import argparse
import io
import pathlib
import sys
import zipfile

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
TASK = HERE / "task"
sys.path.insert(0, str(TASK))

import fltrain  # noqa: E402  (the bundle's own module)


def artifacts() -> dict[str, bytes]:
    from safetensors.numpy import save

    from tether.devtools import fldata

    split = fldata.digits_split()
    buf = io.BytesIO()
    write_npz_to(buf, X=split.X_test, y=split.y_test)
    return {"model.safetensors": save(fltrain.initial_weights(0)), "cloud/heldout.npz": buf.getvalue()}


def write_npz_to(fileobj: io.BytesIO, **arrays: np.ndarray) -> None:
    with zipfile.ZipFile(fileobj, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed files differ from a rebuild")
    args = parser.parse_args()
    stale = []
    for rel, data in artifacts().items():
        path = TASK / rel
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                stale.append(rel)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            print(f"wrote {path} ({len(data)} bytes)")
    if stale:
        print(f"stale: {stale}; run python examples/digits-fl/build.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
