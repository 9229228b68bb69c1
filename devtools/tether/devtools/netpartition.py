"""A real network partition on loopback with iptables: packets to and from one TCP port are dropped.

Unlike the fault proxy's black hole, the kernel drops the packets: SYNs go
unanswered, established connections retransmit into nothing, and nothing is
relayed by a process of ours. Needs root and a working `iptables`
(`available()` says); tests skip without them.

Only the port named is touched (a rule for each direction on `lo`, tagged
with a comment holding this process's id), so other services on the machine
are not affected; the rules go when the context exits, and `sweep_stale()`
removes rules left by a process that was killed before it could.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator

TAG = "tether-partition"


def _iptables(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["iptables", "-w", *args], capture_output=True, text=True, timeout=30, check=False)


def available() -> bool:
    """Root, an iptables binary, and a rule that can be listed."""
    if os.geteuid() != 0 or shutil.which("iptables") is None:
        return False
    try:
        return _iptables("-S", "INPUT").returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _rules(port: int, comment: str) -> list[list[str]]:
    return [
        ["INPUT", "-i", "lo", "-p", "tcp", way, str(port), "-m", "comment", "--comment", comment, "-j", "DROP"]
        for way in ("--dport", "--sport")
    ]


@contextlib.contextmanager
def partition(port: int) -> Iterator[None]:
    """Drop every packet to or from `port` on loopback while the block runs."""
    sweep_stale()
    comment = f"{TAG}:{os.getpid()}:{port}"
    added: list[list[str]] = []
    try:
        for rule in _rules(port, comment):
            done = _iptables("-I", *rule)
            if done.returncode != 0:
                raise RuntimeError(f"iptables refused the rule: {done.stderr.strip()}")
            added.append(rule)
        yield
    finally:
        for rule in added:
            _iptables("-D", *rule)


def sweep_stale() -> int:
    """Remove partition rules whose process is gone; how many were removed."""
    listed = _iptables("-S", "INPUT")
    removed = 0
    for line in listed.stdout.splitlines():
        if TAG not in line or not line.startswith("-A INPUT"):
            continue
        tag = next((part.strip('"') for part in line.split() if part.strip('"').startswith(TAG)), "")
        try:
            pid = int(tag.split(":")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            _iptables("-D", *line.split()[1:])
            removed += 1
    return removed
