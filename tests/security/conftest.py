"""Fixtures of the security tests: a real controller on loopback (plaintext, TLS or mTLS) over a fresh database.

The controller, its config, `start`, enqueuer and clients are tests/conftest.py's; here they differ as below.
"""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from tether.common import certs, config

pytest.importorskip("tether.controller.server")


@pytest.fixture()
def controller_config(controller_config: config.ControllerConfig) -> config.ControllerConfig:
    return dataclasses.replace(controller_config, grace_s=0.2)


@pytest.fixture()
async def controller(controller_config, start):
    return await start(controller_config, auth_cache_s=0.3)


@pytest.fixture(scope="session")
def ca_dir(tmp_path_factory) -> pathlib.Path:
    """A CA with a server certificate for the loopback names, and a client certificate `device-1`."""
    d = tmp_path_factory.mktemp("ca")
    certs.init_ca_dir(d, hosts=("localhost", "127.0.0.1"))
    certs.issue_client(d, "device-1")
    return d


@pytest.fixture(scope="session")
def other_ca_dir(tmp_path_factory) -> pathlib.Path:
    """An unrelated CA (its certificates must be refused by the first one's controller)."""
    d = tmp_path_factory.mktemp("other-ca")
    certs.init_ca_dir(d, hosts=("localhost", "127.0.0.1"))
    certs.issue_client(d, "intruder")
    return d
