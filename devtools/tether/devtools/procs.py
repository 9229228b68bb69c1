"""Child processes for `tether demo` and the e2e scenarios.

Each component runs as its own OS process in its own session (process group),
with its output in a log file, so that a stop kills the whole tree and a failed
start shows the component's own last words.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence


class ComponentFailed(RuntimeError):
    pass


@dataclasses.dataclass
class Component:
    name: str
    argv: Sequence[str]
    log_path: pathlib.Path
    env: Mapping[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Component:
        env = {**os.environ, **(self.env or {}), "PYTHONUNBUFFERED": "1"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                list(self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def wait_for(self, pattern: str, *, timeout: float) -> re.Match[str]:
        """Wait until the component's output matches `pattern`; fail fast if it exits."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                m = rx.search(self.log_path.read_text(errors="replace"))
                if m:
                    return m
            if not self.alive():
                raise ComponentFailed(f"{self.name} exited before it was ready:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ComponentFailed(f"{self.name} was not ready within {timeout:.0f}s:\n{self.log_tail()}")
            await asyncio.sleep(0.1)

    def stop(self, *, timeout: float = 15) -> None:
        """SIGTERM the component's process group, then SIGKILL what is left."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL the whole group at once (crash tests)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def tether_argv(*args: str) -> list[str]:
    """argv running a `tether` subcommand with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "tether.cli.main", *args]
