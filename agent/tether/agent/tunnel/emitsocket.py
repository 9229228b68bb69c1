"""The agent's end of `ctx.emit`: a Unix socket the task workers write records to.

Framing is `emitter`'s. Each request names a grant token (handed to the run
in its job document, one per release, so a record says which task emitted
it) and a topic; the payload follows. The server reads a frame only after
checking its declared sizes (a payload over the limit is refused unread and
the connection closed), then hands it to `accept` (the `relay.Tunnel`: topic,
size and rate checks, then the outbox commit) and answers with the seq or the
refusal. Bounded: at most MAX_CONNECTIONS at once; a refusal affects only
that request. The socket file is 0600 and lives in the agent's state
directory (or a private temporary directory when that path is too long for
AF_UNIX).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from tether.agent import unixserver
from tether.agent.tunnel import emitter
from tether.common import errors
from tether.spec import emits

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
MAX_SOCKET_PATH = 107  # AF_UNIX on Linux, without the terminating NUL

# accept(token, topic, payload) -> seq; raises errors.TetherError with the reason.
Accept = Callable[[str, str, bytes], int]
# refused(token, limit, message): a refusal the worker decided itself (a payload over the limit), to count.
Refused = Callable[[str, str, str], None]


def socket_path_for(state_dir: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path | None]:
    """Where the socket goes: `<state dir>/emit.sock`, or a private temp dir (returned, to remove) if too long."""
    path = state_dir / "emit.sock"
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path, None
    # $TMPDIR may be long too (pytest's, a sandbox's): then /tmp.
    base = tempfile.gettempdir()
    if len(os.fsencode(base)) > MAX_SOCKET_PATH - 40:
        base = "/tmp"
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="tether-emit-", dir=base))
    return tmp / "emit.sock", tmp


class EmitServer:
    def __init__(
        self,
        path: pathlib.Path,
        *,
        accept: Accept,
        refused: Refused,
        max_payload_bytes: int,
        tmp_dir: pathlib.Path | None,
    ) -> None:
        self.path = path
        self._accept = accept
        self._refused = refused
        self._max_payload = max_payload_bytes
        self._tmp_dir = tmp_dir
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._server = await unixserver.listen(self.path, self._serve)

    async def stop(self) -> None:
        server, self._server = self._server, None
        await unixserver.close(server, self._clients, self.path)
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._clients) >= MAX_CONNECTIONS:
            await _reply(writer, {"error": "too many emit connections", "limit": None})
            writer.close()
            return
        self._clients.add(task)
        try:
            while True:
                try:
                    header = await reader.readexactly(emitter.HEADER.size)
                except asyncio.IncompleteReadError:
                    return
                meta_len, payload_len = emitter.HEADER.unpack(header)
                if meta_len > emitter.MAX_META_BYTES:
                    await _reply(writer, {"error": f"request header longer than {emitter.MAX_META_BYTES} bytes"})
                    return
                if payload_len > self._max_payload:
                    error = emits.LimitExceeded(
                        emits.LIMIT_PAYLOAD, f"payload of {payload_len} bytes, at most {self._max_payload} allowed"
                    )
                    await _reply(writer, {"error": str(error), "limit": error.limit})
                    return  # unread bytes follow: the frame boundary is lost
                meta = await reader.readexactly(meta_len)
                payload = await reader.readexactly(payload_len)
                await _reply(writer, self.handle(meta, payload))
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def handle(self, meta: bytes, payload: bytes) -> dict[str, Any]:
        """One request -> its reply: {"seq"} or {"error", "limit"}."""
        try:
            doc = json.loads(meta)
            if not isinstance(doc, dict) or not isinstance(doc.get("token"), str):
                raise ValueError("expected {token, topic}")
        except ValueError as e:
            return {"error": f"malformed request: {e}", "limit": None}
        told = doc.get("refused")
        if isinstance(told, dict):  # the worker refused an emit itself: count it, answer nothing useful
            self._refused(doc["token"], str(told.get("limit"))[:64], str(told.get("message"))[:500])
            return {"noted": True}
        try:
            return {"seq": self._accept(doc["token"], doc.get("topic"), payload)}  # type: ignore[arg-type]
        except emits.LimitExceeded as e:
            return {"error": str(e), "limit": e.limit}
        except errors.TetherError as e:
            return {"error": str(e), "limit": None}
        except Exception as e:  # the outbox could not take it (disk full, I/O error): the task hears why
            log.warning("tunnel: storing an emitted record failed: %s", e)
            return {"error": f"the agent could not store the record: {type(e).__name__}: {e}", "limit": None}


async def _reply(writer: asyncio.StreamWriter, doc: dict[str, Any]) -> None:
    data = json.dumps(doc, separators=(",", ":")).encode()
    writer.write(emitter.REPLY.pack(len(data)) + data)
    await writer.drain()
