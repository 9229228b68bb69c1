"""e2e scenarios: every component its own OS process, driven through the `tether` CLI.

With TETHER_E2E_KUBECONFIG set, the scenarios also run against that real cluster
(the CRD is applied there); otherwise they use the in-process Kubernetes API emulator.
"""

from __future__ import annotations

import os
import uuid

import psutil
import pytest


def processes_marked(mark: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("TETHER_E2E_MARK") == mark:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def cmdlines_marked(mark: str) -> list[list[str]]:
    """The command lines of the marked processes still running (one that exits meanwhile is not listed)."""
    found = []
    for proc in processes_marked(mark):
        try:
            found.append(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.fixture()
def e2e_env(tmp_path):
    """Environment for a scenario: a private TMPDIR and a mark inherited by every child process."""
    mark = uuid.uuid4().hex
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TETHER_E2E_MARK": mark, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
    for var in ("TETHER_DATABASE_URL", "TETHER_BROKER_URL", "TETHER_KUBECONFIG"):
        env.pop(var, None)
    if os.environ.get("TETHER_E2E_KUBECONFIG"):
        env["TETHER_KUBECONFIG"] = os.environ["TETHER_E2E_KUBECONFIG"]
    yield env, mark, tmp
    for proc in processes_marked(mark):  # never leave a stray process behind, even on failure
        proc.kill()
