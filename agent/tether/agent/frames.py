"""Length-prefixed JSON frames: what the agent, the zygote and warm task workers say to each other.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8
JSON (an object). The length is checked against a bound before anything is
read, so a peer that writes garbage (or a length of 2 GiB) is caught at once:
`FrameError` says what was wrong, and the agent kills the peer. Tensors do not
travel in frames: a warm worker writes them into shared memory and its frame
names their dtype, shape and offset (`tether.agent.warmworker`).

Two readers: `read_frame` for a blocking socket (the zygote and the worker,
which are single-threaded) and `read_frame_async` for an asyncio StreamReader
(the agent).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any

HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 40 * 1024 * 1024  # ctx.inputs (16 MiB of JSON) plus ctx.state (1 MiB), with room


class FrameError(Exception):
    """A peer broke the protocol: a closed channel, a bad length, bytes that are not a JSON object."""


def encode(doc: dict[str, Any]) -> bytes:
    data = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode("utf-8")
    if len(data) > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {len(data)} bytes is over the limit of {MAX_FRAME_BYTES}")
    return HEADER.pack(len(data)) + data


def decode(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise FrameError(f"frame is not JSON: {str(e)[:200]}") from None
    if not isinstance(doc, dict):
        raise FrameError("frame is not a JSON object")
    return doc


def check_length(length: int, limit: int = MAX_FRAME_BYTES) -> int:
    if length > limit:
        raise FrameError(f"frame length {length} is over the limit of {limit}")
    return length


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise FrameError("channel closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket, *, limit: int = MAX_FRAME_BYTES) -> dict[str, Any]:
    """One frame from a blocking socket; FrameError on EOF or garbage."""
    (length,) = HEADER.unpack(_recv_exactly(sock, HEADER.size))
    return decode(_recv_exactly(sock, check_length(length, limit)))


def write_frame(sock: socket.socket, doc: dict[str, Any]) -> None:
    sock.sendall(encode(doc))


async def read_frame_async(reader: asyncio.StreamReader, *, limit: int = MAX_FRAME_BYTES) -> dict[str, Any]:
    """One frame from an asyncio stream; FrameError on EOF or garbage."""
    try:
        (length,) = HEADER.unpack(await reader.readexactly(HEADER.size))
        return decode(await reader.readexactly(check_length(length, limit)))
    except asyncio.IncompleteReadError:
        raise FrameError("channel closed") from None
