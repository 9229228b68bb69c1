"""Packaging: the wheel holds every component under the one `tether` namespace,
and a wheel install imports and runs from anywhere (not only from this checkout)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    # Build from a copy of the tracked files: an in-tree build would leave a build/ directory
    # whose stale modules could end up in later wheels.
    src = tmp_path_factory.mktemp("src")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for rel in filter(None, tracked.decode().split("\0")):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    (whl,) = out.glob("tether-*.whl")
    return whl


def test_wheel_contains_each_component_and_its_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "tether/proto/v1/tether_pb2.py",
        "tether/proto/v1/tether.proto",
        "tether/common/manifest.py",
        "tether/cli/main.py",
        "tether/agent/__init__.py",
        "tether/controller/migrations/20261121_0001_initial.sql",
        "tether/operator/__init__.py",
        "tether/dashboard/app.py",
        "tether/dashboard/templates/task.html",
        "tether/dashboard/static/dashboard.js",
        "tether/dashboard/static/vendor/uplot/uPlot.iife.min.js",
        "tether/dashboard/static/vendor/uplot/LICENSE",
        "tether/examples/digits/task/model.mnn",
        "tether/examples/digits/mltask.yaml",
        "tether/examples/digits-fl/task/model.safetensors",
        "tether/examples/digits-fl/task/cloud/heldout.npz",
        "tether/examples/digits-fl/task/fltrain.py",
    ):
        assert required in names, required
    # The namespace root carries no __init__.py, and nothing lands at top level but `tether`.
    assert "tether/__init__.py" not in names
    assert {n.split("/")[0] for n in names if not n.startswith("tether-")} == {"tether"}


def test_wheel_install_runs_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    # -S: no site processing, so the editable install of this checkout is invisible;
    # dependencies come from the plain site-packages directory added by hand.
    site_packages = sysconfig.get_paths()["purelib"]
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]];"
        "import tether.agent, tether.controller, tether.operator, tether.proto.v1.tether_pb2, tether.examples;"
        "assert all(m.__file__.startswith(sys.argv[1]) for m in "
        "(tether.agent, tether.controller, tether.operator, tether.examples)), 'imported from the checkout';"
        "from tether.cli.main import cli; cli(['--help'], prog_name='tether')"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code, str(target), site_packages],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout and "agent" in proc.stdout
