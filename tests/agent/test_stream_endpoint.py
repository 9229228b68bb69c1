"""The local event endpoint: EventClient -> Unix socket -> EventServer -> StreamProcessor."""

from __future__ import annotations

import asyncio
import pathlib
import shutil
import socket
import tempfile

import pytest

from tether.agent import events
from tether.agent.stream import processor
from tether.agent.stream.endpoint import MAX_LINE_BYTES, EventServer
from tether.agent.stream.eventstore import EventStore
from tether.common import errors
from tether.spec import streams

T0 = 1_700_000_000.0


@pytest.fixture()
def sock_dir():
    d = pathlib.Path(tempfile.mkdtemp(prefix="tev-", dir="/tmp"))  # AF_UNIX paths are short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture()
async def endpoint(sock_dir, tmp_path):
    fired = []
    proc = processor.StreamProcessor(EventStore(tmp_path / "events.db"), on_match=lambda o, f: fired.append(o))
    proc.register(
        "ns/cart",
        streams.StreamSpec.from_trigger(
            {"pattern": {"steps": [{"type": "page_view"}, {"type": "add_to_cart"}], "within": 30}},
            require_pattern=True,
        ),
    )
    srv = EventServer(proc, sock_dir / "events.sock")
    await srv.start()
    yield srv, proc, fired
    await srv.stop()


async def test_client_sends_events_and_sees_matches(endpoint) -> None:
    srv, proc, fired = endpoint
    assert (srv.path.stat().st_mode & 0o777) == 0o600

    def app() -> list[events.Ack]:
        with events.EventClient(srv.path) as c:
            return [
                c.send("page_view", page="item", attrs={"sku": "a1", "price": 10}),
                c.send_many([{"type": "add_to_cart", "page": "item", "attrs": {"sku": "a1"}}, {"type": "bad type"}]),
            ]

    first, second = await asyncio.to_thread(app)
    assert (first.accepted, first.rejected, first.matched) == (1, 0, 0)
    assert (second.accepted, second.rejected, second.matched) == (1, 1, 1)
    assert "type: 'bad type' must match" in second.errors[0]
    assert fired == ["ns/cart"] and proc.store.count() == 2


async def test_malformed_lines_are_answered_and_the_connection_survives(endpoint) -> None:
    srv, proc, _ = endpoint

    def raw() -> list[bytes]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(srv.path))
            s.sendall(b"not json\n42\n\n" + b'{"type": "ok", "ts": %d}\n' % T0)
            data = b""
            while data.count(b"\n") < 4:
                data += s.recv(4096)
            return data.splitlines()

    lines = await asyncio.to_thread(raw)
    assert b"not valid JSON" in lines[0] and b"expected an event object" in lines[1]
    assert lines[2] == b'{"accepted":0,"rejected":0,"matched":0,"errors":[]}'
    assert b'"accepted":1' in lines[3]
    assert proc.rejected == 2 and proc.accepted == 1


async def test_an_overlong_line_closes_only_that_connection(endpoint) -> None:
    srv, _, _ = endpoint

    def flood() -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(srv.path))
            try:
                s.sendall(b"x" * (MAX_LINE_BYTES + 10) + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            return s.recv(4096)

    assert b"line longer than" in await asyncio.to_thread(flood)
    ack = await asyncio.to_thread(lambda: events.EventClient(srv.path).send("still_up"))
    assert ack.accepted == 1


def test_client_reports_an_unreachable_agent(sock_dir) -> None:
    with pytest.raises(events.EventError, match="cannot reach the agent"):
        events.EventClient(sock_dir / "nothing.sock").send("x")


def test_a_socket_path_too_long_for_af_unix_is_refused_clearly(tmp_path) -> None:
    proc = processor.StreamProcessor(EventStore(tmp_path / "e.db"))
    with pytest.raises(errors.InvalidArgument, match="longer than 107 bytes"):
        EventServer(proc, "/tmp/" + "x" * 120 + "/events.sock")
