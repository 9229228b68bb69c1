"""`ctx.emit` in a worker process to the agent's socket: accepted, refused with the reason, bounded."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import struct
import tempfile

import pytest

from tether.agent.tunnel import emitter, relay
from tether.spec import emits


async def _never(batch):
    await asyncio.sleep(3600)


@pytest.fixture()
async def tunnel(tmp_path):
    t = relay.Tunnel(
        state_dir=tmp_path / "a-state-directory-with-a-long-name" / ("x" * 80),  # too long for AF_UNIX: a temp dir
        send=_never,
        limits=emits.TunnelLimits(max_payload_bytes=1000, burst_records=4, records_per_s=0.001, burst_bytes=10_000),
    )
    await t.start()
    yield t
    await t.stop()


def _emitter(grant: dict) -> emitter.Emitter:
    return emitter.Emitter(
        socket_path=grant["socket"], token=grant["token"], max_payload_bytes=grant["max_payload_bytes"]
    )


async def test_a_worker_emits_through_the_socket_and_hears_why_when_refused(tunnel) -> None:
    grant = tunnel.grant("ns/task")
    assert grant is not None and tunnel.grant("ns/task") == grant  # one token per release

    def worker() -> list:
        emit, out = _emitter(grant), []
        out.append(emit("t", b"bytes"))
        out.append(emit("t", "text"))
        out.append(emit("t", {"json": [1, 2]}))
        for call in (
            lambda: emit("t", b"x" * 1001),  # refused in the worker, before sending
            lambda: emit("t", float("nan")),  # not JSON
            lambda: emit("bad topic", b""),
            lambda: emit("t", b"4th"),  # the 4th record: within the burst
            lambda: emit("t", b"5th"),  # too fast
        ):
            try:
                out.append(call())
            except emitter.EmitRefused as e:
                out.append((e.limit, str(e)))
        emit.close()
        return out

    out = await asyncio.to_thread(worker)
    seqs = [x for x in out if isinstance(x, int)]
    assert len(seqs) == 4 and seqs == sorted(seqs)
    refusals = [x for x in out if isinstance(x, tuple)]
    assert [limit for limit, _ in refusals] == ["payload_bytes", None, None, "records_per_s"]
    assert "payload of 1001 bytes, at most 1000" in refusals[0][1] and "JSON" in refusals[1][1]
    assert refusals[2][1].startswith("topic: ")
    kept = tunnel.outbox.oldest(max_records=10, max_bytes=10**6)
    data = [r for r in kept if r.topic == "t"]
    assert [r.payload for r in data] == [b"bytes", b"text", b'{"json":[1,2]}', b"4th"]
    assert {r.release for r in kept} == {"ns/task"}
    # Reported upstream: the first refusal of the minute (the payload the worker refused and told the agent
    # of), on tether.refusals; every refusal counted.
    (report,) = [json.loads(r.payload) for r in kept if r.topic == relay.REFUSALS_TOPIC]
    assert report["release"] == "ns/task" and report["limit"] == "payload_bytes"
    assert report["refused"] == {"payload_bytes": 1} and "payload of 1001 bytes" in report["message"]
    assert dict(tunnel.refused) == {
        ("ns/task", "payload_bytes"): 1,
        ("ns/task", "topic"): 1,
        ("ns/task", "records_per_s"): 1,
    }


def _raw(path: str, meta: bytes, payload_len: int, payload: bytes = b"") -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(struct.pack("!II", len(meta), payload_len) + meta + payload)
        (n,) = struct.unpack("!I", s.recv(4))
        return json.loads(s.recv(n))


async def test_the_socket_refuses_unknown_tokens_garbage_and_oversized_frames_unread(tunnel) -> None:
    path = tunnel.grant("ns/task")["socket"]
    unknown = await asyncio.to_thread(_raw, path, json.dumps({"token": "forged", "topic": "t"}).encode(), 1, b"x")
    assert "unknown emit token" in unknown["error"]
    garbage = await asyncio.to_thread(_raw, path, b"{not json", 0)
    assert garbage["error"].startswith("malformed request")
    huge = await asyncio.to_thread(_raw, path, b"{}", 10**9)  # a gigabyte announced: refused before reading
    assert huge["limit"] == "payload_bytes" and "1000000000 bytes" in huge["error"]
    assert len(tunnel.outbox) == 0


def test_the_socket_goes_to_tmp_when_the_state_dir_and_tmpdir_are_both_too_long(tmp_path, monkeypatch) -> None:
    from tether.agent.tunnel import emitsocket

    long_tmp = tmp_path / ("t" * 100)
    long_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(long_tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    path, made = emitsocket.socket_path_for(tmp_path / ("s" * 120))
    try:
        assert made is not None and str(path).startswith("/tmp/tether-emit-")
        assert len(str(path)) <= emitsocket.MAX_SOCKET_PATH
    finally:
        shutil.rmtree(made, ignore_errors=True)


async def test_without_a_tunnel_ctx_emit_says_so(tmp_path) -> None:
    with pytest.raises(emitter.EmitRefused, match="no real-time tunnel"):
        emitter.unavailable("t", b"x")
    disabled = relay.for_agent(tmp_path, _never, None, asyncio.Event())
    await disabled.start()
    assert disabled.grant("ns/task") is None
    await disabled.stop()
