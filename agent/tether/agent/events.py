"""The Python client apps use to feed behaviour events to the local agent.

    from tether.agent.events import EventClient

    with EventClient("~/.tether/agent/events.sock") as events:
        events.send("page_view", page="item", attrs={"item": "sku-1", "price": 12.5})
        events.send_many([{"type": "add_to_cart", "page": "item", "attrs": {"item": "sku-1"}}])
        events.report_state(charging=True, metered=False, idle=None, battery_level=80, ttl_s=300)

It speaks the agent's newline-delimited JSON protocol over a Unix socket
(`tether.agent.stream.endpoint`). Each call waits for the agent's reply and
returns an `Ack`; events the agent rejected are listed in `Ack.errors` (an app
should not crash because one event was malformed). `report_state` tells the
agent what the app knows of the device (charging, metered network, user idle,
battery level; None: unknown): it overrides the agent's own probes for
`ttl_s` seconds (participation conditions, `tether.agent.devicestate`). A timestamp defaults to
the client's clock at `send`. Standard library only, so an app can vendor it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from collections.abc import Iterable, Mapping
from typing import Any

DEFAULT_SOCKET = "~/.tether/agent/events.sock"


class EventError(Exception):
    """The agent could not be reached, or answered with an error for the whole request."""


@dataclasses.dataclass(frozen=True)
class Ack:
    accepted: int
    rejected: int
    matched: int
    errors: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class StateAck:
    state: Mapping[str, str]  # what the agent took: "charging" -> "true", "unmeteredNetwork" -> "false", ...
    expires_in_s: float


class EventClient:
    def __init__(self, path: str | os.PathLike[str] = DEFAULT_SOCKET, *, timeout_s: float = 5.0) -> None:
        self.path = os.path.expanduser(os.fspath(path))
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._buffer = b""

    def __enter__(self) -> EventClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(self.path)
        except OSError as e:
            sock.close()
            raise EventError(f"cannot reach the agent at {self.path}: {e}") from None
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buffer = b""

    def send(
        self,
        type: str,
        page: str = "",
        *,
        attrs: Mapping[str, Any] | None = None,
        ts: float | None = None,
        key: str = "",
    ) -> Ack:
        event: dict[str, Any] = {"type": type, "page": page, "ts": time.time() if ts is None else ts}
        if attrs:
            event["attrs"] = dict(attrs)
        if key:
            event["key"] = key
        return self._request(event)

    def send_many(self, events: Iterable[Mapping[str, Any]]) -> Ack:
        now = time.time()
        batch = [dict(e) if "ts" in e else {**e, "ts": now} for e in events]
        return self._request(batch)

    def report_state(
        self,
        *,
        charging: bool | None = None,
        metered: bool | None = None,
        idle: bool | None = None,
        battery_level: float | None = None,
        ttl_s: float | None = None,
        unset: bool = False,
    ) -> StateAck:
        """Report device state; only the keys given (or all of them as unknown with `unset`) are sent."""
        state: dict[str, Any] = {}
        for key, value in (("charging", charging), ("metered", metered), ("idle", idle)):
            if value is not None or unset:
                state[key] = value
        if battery_level is not None:
            state["batteryLevel"] = battery_level
        if not state:
            raise EventError("report_state: nothing to report")
        doc: dict[str, Any] = {"state": state}
        if ttl_s is not None:
            doc["ttlSeconds"] = ttl_s
        reply = self._exchange(doc)
        return StateAck(state=dict(reply.get("state") or {}), expires_in_s=float(reply.get("expiresIn", 0.0)))

    def _request(self, doc: Any) -> Ack:
        reply = self._exchange(doc)
        return Ack(
            accepted=int(reply.get("accepted", 0)),
            rejected=int(reply.get("rejected", 0)),
            matched=int(reply.get("matched", 0)),
            errors=tuple(reply.get("errors") or ()),
        )

    def _exchange(self, doc: Any) -> dict[str, Any]:
        self.connect()
        assert self._sock is not None
        try:
            self._sock.sendall(json.dumps(doc, separators=(",", ":"), allow_nan=False).encode() + b"\n")
            while b"\n" not in self._buffer:
                chunk = self._sock.recv(65536)
                if not chunk:
                    raise EventError("the agent closed the connection")
                self._buffer += chunk
        except (OSError, ValueError) as e:
            self.close()
            raise EventError(f"sending events failed: {e}") from None
        line, _, self._buffer = self._buffer.partition(b"\n")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise EventError(reply["error"])
        return reply
