"""Crash-safe file writes for the agent's durable files (state, task state, results, install pointers).

Readers of a file written here see the old or the new content, never a mix:
the data goes to a temporary file in the same directory, is fsynced, and is
renamed over the target; the directory is then fsynced so the rename survives
a power loss. Apart from the bundle store's layout, so every room that keeps a
file (state, runs, backend cache) writes it the same way. Blocking: call from a
worker thread in async code.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from typing import Any


def fsync_dir(path: pathlib.Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: pathlib.Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old or the new content, never a mix (tmp + fsync + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: pathlib.Path, doc: Any) -> None:
    atomic_write(path, json.dumps(doc, indent=1, sort_keys=True).encode("utf-8"))
