"""`ctx.emit(topic, payload)` inside a task's worker process.

The worker never talks to the controller: it hands each record to the agent
over the agent's Unix socket (`emitsocket`), which checks it, commits it to
the durable outbox and answers; `emit` returns the record's seq once the
record is safe on the device, or raises `EmitRefused` saying why (too large,
too fast, outbox full, bad topic, no tunnel). A refusal affects nothing but
that emit: the task may catch it, slow down and try again.

Wire format, both ways length-prefixed (`!II` then the parts; replies `!I`):
request = (len(meta), len(payload)) meta payload, meta = JSON {"token", "topic"};
reply = JSON {"seq": n} or {"error": "...", "limit": name or null}.

`payload`: bytes-like as is, `str` as UTF-8, anything else as compact JSON
(NaN refused). Standard library only: it runs beside untrusted task code.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from collections.abc import Callable, Mapping
from typing import Any

from tether.common import errors

HEADER = struct.Struct("!II")
REPLY = struct.Struct("!I")
MAX_META_BYTES = 4096
MAX_REPLY_BYTES = 64 * 1024


class EmitRefused(errors.TetherError):
    """An emit the agent did not accept; `limit` names the tunnel limit when one was hit."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, limit: str | None = None) -> None:
        super().__init__(message)
        self.limit = limit


def encode_payload(payload: Any) -> bytes:
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode("utf-8")
    try:
        return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise EmitRefused(f"payload: not bytes, str or JSON-able: {e}") from None


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the agent closed the emit socket")
        buf += chunk
    return bytes(buf)


class Emitter:
    """Callable `emit(topic, payload) -> seq`; connects on first use and reconnects once after a break."""

    def __init__(self, *, socket_path: str, token: str, max_payload_bytes: int, timeout_s: float = 30.0) -> None:
        self.socket_path = socket_path
        self.token = token
        self.max_payload_bytes = max_payload_bytes
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout_s)
            try:
                sock.connect(self.socket_path)
            except OSError as e:
                sock.close()
                raise EmitRefused(f"the agent's tunnel is not reachable: {e}") from None
            self._sock = sock
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _tell_refused(self, topic: str, limit: str, message: str) -> None:
        """A refusal decided here, reported to the agent (it counts and reports refusals); best effort."""
        with contextlib.suppress(EmitRefused):
            self._request({"token": self.token, "topic": topic, "refused": {"limit": limit, "message": message}}, b"")

    def __call__(self, topic: str, payload: Any) -> int:
        if not isinstance(topic, str):
            raise EmitRefused(f"topic: must be a string, got {type(topic).__name__}")
        data = encode_payload(payload)
        if len(data) > self.max_payload_bytes:  # refused here, before the payload moves; the agent is told
            message = (
                f"tunnel limit payload_bytes exceeded: payload of {len(data)} bytes, "
                f"at most {self.max_payload_bytes} allowed"
            )
            self._tell_refused(topic, "payload_bytes", message)
            raise EmitRefused(message, limit="payload_bytes")
        reply = self._request({"token": self.token, "topic": topic}, data)
        if "seq" in reply:
            return int(reply["seq"])
        raise EmitRefused(str(reply.get("error", "refused")), limit=reply.get("limit"))

    def _request(self, doc: dict[str, Any], data: bytes) -> dict[str, Any]:
        meta = json.dumps(doc).encode("utf-8")
        if len(meta) > MAX_META_BYTES:
            raise EmitRefused(f"topic: longer than {MAX_META_BYTES} bytes")
        # A send on a connection the agent closed meanwhile (it restarted) is retried once on a new one;
        # once the request is out, a lost reply is not retried (the record may be in the outbox already).
        for attempt in (0, 1):
            reused = self._sock is not None
            sock = self._connect()
            try:
                sock.sendall(HEADER.pack(len(meta), len(data)) + meta + data)
            except OSError as e:
                self.close()
                if attempt or not reused:
                    raise EmitRefused(f"the agent's tunnel is not reachable: {e}") from None
                continue
            try:
                (n,) = REPLY.unpack(_recv_exact(sock, REPLY.size))
                if n > MAX_REPLY_BYTES:
                    raise ConnectionError("reply too long")
                reply = json.loads(_recv_exact(sock, n))
            except (OSError, ValueError) as e:
                self.close()
                raise EmitRefused(f"the agent's tunnel did not answer (the record may be sent): {e}") from None
            break
        if not isinstance(reply, dict):
            raise EmitRefused("the agent's tunnel answered garbage")
        return reply


def unavailable(topic: str, payload: Any) -> int:
    """`ctx.emit` where the agent runs no tunnel."""
    raise EmitRefused("this agent runs no real-time tunnel (ctx.emit is unavailable)")


def from_grant(grant: Mapping[str, Any] | None) -> Callable[..., int]:
    """`ctx.emit` for a run the agent granted the tunnel to (a job's `emit`), else `unavailable`."""
    if not grant:
        return unavailable
    return Emitter(
        socket_path=str(grant["socket"]), token=str(grant["token"]), max_payload_bytes=int(grant["max_payload_bytes"])
    )
