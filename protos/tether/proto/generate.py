"""Regenerate the committed Python stubs from the .proto sources.

    python -m tether.proto.generate            # rewrite the stubs in place
    python -m tether.proto.generate --check    # exit 1 if they are stale

The stubs are committed so that devices do not need grpcio-tools; a test runs
the check so the two can never drift apart.
"""

from __future__ import annotations

import argparse
import filecmp
import pathlib
import shutil
import sys
import tempfile

PROTO_ROOT = pathlib.Path(__file__).resolve().parents[2]  # .../protos
PACKAGE_DIR = PROTO_ROOT / "tether" / "proto" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _generate(out_root: pathlib.Path) -> list[pathlib.Path]:
    from grpc_tools import protoc  # build-time tool only

    sources = sorted(PACKAGE_DIR.glob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(s.relative_to(PROTO_ROOT)) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generated = out_root / "tether" / "proto" / "v1"
    return sorted(p for p in generated.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = _generate(pathlib.Path(tmp))
        stale = [
            f.name
            for f in fresh
            if not (PACKAGE_DIR / f.name).exists() or not filecmp.cmp(f, PACKAGE_DIR / f.name, shallow=False)
        ]
        if args.check:
            if stale:
                print(f"stale generated stubs: {', '.join(stale)}; run python -m tether.proto.generate")
                return 1
            print("generated stubs are up to date")
            return 0
        for f in fresh:
            shutil.copyfile(f, PACKAGE_DIR / f.name)
        print(f"wrote {len(fresh)} files to {PACKAGE_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
