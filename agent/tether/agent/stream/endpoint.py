"""The local ingestion endpoint: newline-delimited JSON over a Unix socket.

Apps on the device connect to the agent's socket (`<state dir>/events.sock`
by default; file mode 0600, so only the agent's user, or a group you grant,
can write) and send one JSON value per line: an event object, or an array of
up to 1000 events. Each line gets one reply line::

    {"accepted": 2, "rejected": 1, "matched": 0, "errors": ["[1] ts: ... "]}

A line that is not JSON, too long (MAX_LINE_BYTES), or neither an object nor
an array is answered with `{"error": "..."}` and counted as one rejected
event; the connection stays open. `tether.agent.events.EventClient` speaks
this protocol. An object with a `state` key instead of an event is the app's
report of device state (`{"state": {"charging": true, "metered": false},
"ttlSeconds": 300}`, `tether.agent.devicestate`), answered
`{"state": {...}, "expiresIn": 300}` or `{"error": "state.idle: ..."}`.
The server never lets a client stall the agent: at most
MAX_CONNECTIONS at once, bounded lines, and ingestion is synchronous and
short (one small SQLite transaction per line).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

from tether.agent import unixserver
from tether.agent.stream.processor import StreamProcessor
from tether.common import errors
from tether.spec import jsontext

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 1024 * 1024
MAX_CONNECTIONS = 64
# AF_UNIX paths are limited to 108 bytes including the terminating NUL on Linux.
MAX_SOCKET_PATH = 107


class EventServer:
    """`await server.start()`, then `await server.stop()`; feeds `processor`."""

    def __init__(
        self,
        processor: StreamProcessor,
        path: str | os.PathLike[str],
        *,
        mode: int = 0o600,
        state_report: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.processor = processor
        self.state_report = state_report  # devicestate.Conditions.report: device state the app knows
        self.path = pathlib.Path(path)
        self.mode = mode
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise errors.InvalidArgument(
                f"event socket path {str(self.path)!r} is longer than {MAX_SOCKET_PATH} bytes; choose a shorter one"
            )
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._server = await unixserver.listen(self.path, self._serve, mode=self.mode, limit=MAX_LINE_BYTES)
        log.info("event endpoint listening on %s", self.path)

    async def stop(self) -> None:
        server, self._server = self._server, None
        await unixserver.close(server, self._clients, self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._clients) >= MAX_CONNECTIONS:
            writer.write(b'{"error": "too many connections"}\n')
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()
            return
        self._clients.add(task)
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    return  # the client closed the connection
                except asyncio.LimitOverrunError:
                    self.processor.rejected += 1
                    writer.write(json.dumps({"error": f"line longer than {MAX_LINE_BYTES} bytes"}).encode() + b"\n")
                    await writer.drain()
                    return  # we cannot find the next line boundary reliably: close
                reply = self.handle_line(line)
                writer.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def handle_line(self, line: bytes) -> dict[str, Any]:
        """One request line -> its reply (pure apart from the processor; unit-testable)."""
        text = line.strip()
        if not text:
            return {"accepted": 0, "rejected": 0, "matched": 0, "errors": []}
        try:
            doc = jsontext.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            self.processor.rejected += 1
            return {"error": f"not valid JSON: {e}"}
        if isinstance(doc, dict) and "state" in doc and "type" not in doc:
            if self.state_report is None:
                return {"error": "this agent takes no device state reports"}
            try:
                return self.state_report(doc)
            except errors.InvalidArgument as e:
                return {"error": str(e)}
        if isinstance(doc, dict):
            docs: list[Any] = [doc]
        elif isinstance(doc, list):
            docs = doc
        else:
            self.processor.rejected += 1
            return {"error": f"expected an event object or an array of events, got {type(doc).__name__}"}
        return self.processor.ingest(docs).to_json()
