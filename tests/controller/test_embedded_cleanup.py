"""Embedded servers do not outlive a process that was killed before it could stop them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil

SCRIPT = """
import sys
from tether.devtools.embedded import EmbeddedPostgres, EmbeddedRedis
pg = EmbeddedPostgres().start()
redis = EmbeddedRedis().start()
print(pg._proc.pid, redis._proc.pid, flush=True)
sys.stdin.read()
"""


def test_servers_stop_when_their_parent_is_sigkilled():
    parent = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(x) for x in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 20
        alive = pids
        while alive and time.monotonic() < deadline:
            alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
            time.sleep(0.1)
        assert alive == [], "embedded servers outlived their killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in pids if "pids" in locals() else []:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
