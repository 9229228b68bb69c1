"""Helpers of the reliability tests (imported as a top-level module: tests have no packages)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

from controller_support import start_controller

from tether.common import config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def controller_in_thread(cfg: config.ControllerConfig) -> Iterator[Any]:
    """A controller on its own event loop in a thread, for synchronous tests (hypothesis)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    running = asyncio.run_coroutine_threadsafe(start_controller(cfg), loop).result(60)
    try:
        yield running
    finally:
        asyncio.run_coroutine_threadsafe(running.stop(grace=0.1), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


class Proxy:
    """A TCP relay that counts bytes and can throttle the server→client direction."""

    def __init__(self, upstream: tuple[str, int], *, down_bytes_per_s: float | None = None) -> None:
        self.upstream = upstream
        self.rate = down_bytes_per_s
        self.down = 0
        self.up = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, down=False)),
            asyncio.create_task(self._pump(up_reader, writer, down=True)),
        ]
        self._tasks.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for t in pumps:
            t.cancel()
        for w in (writer, up_writer):
            w.close()
        self._tasks.difference_update(pumps)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, down: bool) -> None:
        size = 16 * 1024
        while data := await src.read(size):
            if down:
                self.down += len(data)
                if self.rate:
                    await asyncio.sleep(len(data) / self.rate)
            else:
                self.up += len(data)
            dst.write(data)
            await dst.drain()


# ---------------------------------------------------------------- fuzzing
FUZZ_ENV = "TETHER_FUZZ_EXAMPLES"


def fuzz_timeout() -> Any:
    """No per-test timeout for a campaign run (TETHER_FUZZ_EXAMPLES set): it runs as long as it needs."""
    import os

    import pytest

    return pytest.mark.timeout(0) if os.environ.get(FUZZ_ENV, "").strip() else pytest.mark.timeout(300)


def fuzz_examples(default: int) -> int:
    """Examples per fuzzer: a fast subset in the suite, the full campaign with TETHER_FUZZ_EXAMPLES=100000."""
    import os

    value = os.environ.get(FUZZ_ENV, "").strip()
    return int(value) if value else default
