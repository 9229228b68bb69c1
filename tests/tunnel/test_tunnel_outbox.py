"""The device's durable outbox: monotonic seqs across reopen and wipe, acks, the byte bound, a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tether.agent.tunnel.outbox import Outbox
from tether.spec import emits


def test_seqs_increase_and_survive_a_reopen(tmp_path) -> None:
    box = Outbox(tmp_path / "o.db", clock=lambda: 1000.0).open()
    first = [box.append(topic="t", payload=b"%d" % i, release="ns/a") for i in range(3)]
    assert first[0] == 1000 * 1_000_000 + 1 and first == [first[0], first[0] + 1, first[0] + 2]
    assert box.ack(first[1]) == 2 and len(box) == 1
    box.close()
    box = Outbox(tmp_path / "o.db", clock=lambda: 5.0).open()  # reopened: the clock no longer matters
    assert [r.seq for r in box.oldest(max_records=10, max_bytes=10**6)] == [first[2]]
    assert box.append(topic="t", payload=b"x", release="") == first[2] + 1  # never reused, even after acks
    box.close()


def test_a_wiped_outbox_numbers_above_what_the_old_one_sent(tmp_path) -> None:
    old = Outbox(tmp_path / "o.db", clock=lambda: 1000.0).open()
    sent = old.append(topic="t", payload=b"x", release="")
    old.close()
    (tmp_path / "o.db").unlink()
    new = Outbox(tmp_path / "o.db", clock=lambda: 1001.0).open()
    assert new.append(topic="t", payload=b"x", release="") > sent
    new.close()


def test_oldest_respects_the_batch_bounds_but_always_returns_one(tmp_path) -> None:
    box = Outbox(tmp_path / "o.db").open()
    for i in range(5):
        box.append(topic="t", payload=b"x" * 40, release=str(i))
    assert len(box.oldest(max_records=3, max_bytes=10**6)) == 3
    assert len(box.oldest(max_records=10, max_bytes=100)) == 2
    assert len(box.oldest(max_records=10, max_bytes=1)) == 1  # a record larger than the byte bound still goes
    box.close()


def test_the_outbox_is_bounded_in_bytes_and_refuses_naming_the_limit(tmp_path) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=100).open()
    box.append(topic="t", payload=b"x" * 60, release="")
    with pytest.raises(emits.LimitExceeded) as info:
        box.append(topic="t", payload=b"x" * 60, release="")
    assert info.value.limit == "outbox_bytes" and len(box) == 1 and box.pending_bytes == 60
    seq = box.oldest(max_records=1, max_bytes=1)[0].seq
    box.drop(seq)
    assert len(box) == 0 and box.pending_bytes == 0
    box.append(topic="t", payload=b"x" * 60, release="")  # room again
    box.close()


def test_records_acknowledged_before_a_kill_are_all_there(tmp_path) -> None:
    """The writer is SIGKILLed right after its appends returned: every returned seq is in the outbox."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from tether.agent.tunnel.outbox import Outbox
        box = Outbox({str(tmp_path / "o.db")!r}).open()
        for i in range(50):
            print(box.append(topic="t", payload=b"p%d" % i, release="ns/a"), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == -signal.SIGKILL
    acked = [int(line) for line in proc.stdout.split()]
    assert len(acked) == 50
    box = Outbox(tmp_path / "o.db").open()
    kept = box.oldest(max_records=100, max_bytes=10**9)
    assert [r.seq for r in kept] == acked and [r.payload for r in kept] == [b"p%d" % i for i in range(50)]
    box.close()
