"""The container images (images/): what the chart pulls is what the build script tags, and the Containerfile
builds the wheel from every source root. The build itself runs in images/build-and-smoke.sh (.ci/run)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import tomllib

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"


def script_default(name: str) -> str:
    text = (IMAGES / "build-and-smoke.sh").read_text()
    match = re.search(rf"^{name}=\$\{{{name}:-([^}}]+)\}}", text, re.M)
    assert match, f"{name} has no default in build-and-smoke.sh"
    return match.group(1)


def test_the_chart_pulls_the_image_the_build_script_tags():
    values = yaml.safe_load((ROOT / "charts/tether/values.yaml").read_text())
    chart = yaml.safe_load((ROOT / "charts/tether/Chart.yaml").read_text())
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert values["image"]["repository"] == script_default("IMAGE_REPOSITORY")
    assert values["image"]["tag"] in ("", version)  # "" is the chart's appVersion
    assert chart["appVersion"] == version


def test_containerfile_copies_every_source_root_and_runs_unprivileged():
    text = (IMAGES / "Containerfile").read_text()
    setup = (ROOT / "setup.py").read_text()
    roots = re.search(r"SOURCE_ROOTS = \(([^)]*)\)", setup)
    assert roots
    for root in [*re.findall(r'"([^"]+)"', roots.group(1)), "examples"]:
        assert re.search(rf"^COPY {root} {root}$", text, re.M), f"the image's wheel would miss {root}/"
    stages = re.findall(r"^FROM \S+ AS (\S+)$", text, re.M)
    assert stages[-1] == "cloud" and "agent" in stages  # `buildah build` without --target: the cloud image
    assert text.count("USER 10001:10001") == 2
    assert re.search(r"^ARG BASE_IMAGE=\S*python:3\.11-slim-bookworm$", text, re.M)


def test_build_script_parses():
    subprocess.run(["bash", "-n", str(IMAGES / "build-and-smoke.sh")], check=True)
