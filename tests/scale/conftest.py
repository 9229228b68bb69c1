"""Fixtures for the scale-out tests: controllers on 127.0.0.1:0 over a fresh database."""

from __future__ import annotations

import pathlib

import pytest
from controller_support import controller_config

from tether.common import config


@pytest.fixture()
def scale_config(database_url: str, tmp_path: pathlib.Path) -> config.ControllerConfig:
    # blob_dir is shared by the replicas, as an object store would be
    return controller_config(database_url, tmp_path / "blobs", grace_s=0.2, pool_max_size=4)
