"""A Unix-socket server's lifecycle, shared by the agent's local endpoints (events, `ctx.emit`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
from collections.abc import Awaitable, Callable
from typing import Any


async def listen(
    path: pathlib.Path,
    serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    *,
    mode: int = 0o600,
    **kwargs: Any,
) -> asyncio.AbstractServer:
    """Serve on `path` (a stale socket left by a killed agent is replaced), readable by `mode` only."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()
    server = await asyncio.start_unix_server(serve, path=str(path), **kwargs)
    os.chmod(path, mode)
    return server


async def close(server: asyncio.AbstractServer | None, clients: set[asyncio.Task[Any]], path: pathlib.Path) -> None:
    """Stop accepting, end every client's task, and remove the socket file."""
    if server is not None:
        server.close()
        for task in list(clients):
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        with contextlib.suppress(Exception):
            await server.wait_closed()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
