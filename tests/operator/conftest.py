"""Fixtures for the operator tests: the Kubernetes emulator with a kubeconfig in tmp_path."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import pytest

from tether.devtools.emulator import EmulatedCluster, emulated_cluster


@pytest.fixture()
async def cluster(tmp_path: pathlib.Path) -> AsyncIterator[EmulatedCluster]:
    async with emulated_cluster(kubeconfig_path=tmp_path / "kubeconfig.yaml") as c:
        yield c
