"""Fixtures for the scale-out tests: controllers on 127.0.0.1:0 over a fresh database."""

from __future__ import annotations

import pathlib

import pytest
from scale_helpers import ADMIN_TOKEN, BOOTSTRAP_TOKEN

from tether.common import config


@pytest.fixture()
def scale_config(database_url: str, tmp_path: pathlib.Path) -> config.ControllerConfig:
    return config.ControllerConfig(
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        bootstrap_token=BOOTSTRAP_TOKEN,
        listen="127.0.0.1:0",
        blob_dir=tmp_path / "blobs",  # shared by the replicas, as an object store would be
        grace_s=0.2,
        pool_max_size=4,
    )
