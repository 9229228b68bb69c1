from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import numpy as np
import pytest
from agent_fakes import FakeController, start_fake

REPO = pathlib.Path(__file__).resolve().parents[2]
DIGITS = REPO / "examples" / "digits"


@pytest.fixture(scope="session")
def digits_dir() -> pathlib.Path:
    return DIGITS / "task"


@pytest.fixture(scope="session")
def digits_data() -> dict[str, np.ndarray]:
    with np.load(DIGITS / "device_data.npz", allow_pickle=False) as npz:
        return {"X": npz["X"], "y": npz["y"]}


@pytest.fixture()
def data_dir(tmp_path: pathlib.Path, digits_data: dict[str, np.ndarray]) -> pathlib.Path:
    """A device data dir with the first 150 held-out digits."""
    d = tmp_path / "data"
    d.mkdir()
    np.savez(d / "digits.npz", X=digits_data["X"][:150], y=digits_data["y"][:150])
    return d


@pytest.fixture()
async def fake() -> AsyncIterator[FakeController]:
    """The scriptable fake controller (agent_fakes.py), its `address` set; stopped after the test."""
    server, ctl, address = await start_fake()
    ctl.address = address
    yield ctl
    await server.stop(0)
