"""A fault-injecting TCP proxy for network-fault tests and the soak run (issue 14).

Put it between agents and the controller (or any client and server on
loopback): every accepted connection is relayed to `upstream`, and the
faults below are applied to the bytes on the way, in both directions
("up": client → server, "down": server → client). Everything is asyncio
in the caller's event loop; no root, no kernel queueing disciplines.

Faults (`Faults`, swapped at any time with `FaultProxy.set`; what is open
follows at once):
- `refuse`: new connections are accepted and closed at once (a server that
  is down, or a partition seen from a client that gets RST).
- `stall`: a black hole. Bytes already read are held, nothing more is read
  or written, no FIN or RST is sent: the peers learn only from their own
  timeouts or keepalive. Lifting it lets the held bytes through, as after a
  short partition healed.
- `delay_s`: each chunk waits this long before it is written (latency).
- `up_bytes_per_s` / `down_bytes_per_s`: bandwidth per connection.
- `chunk_bytes`: the most one read takes (smaller: finer throttling).

One-shot faults on the connections that are open, or the next ones:
- `cut(down_after=N)` / `cut(up_after=N)`: once N more bytes have gone that
  way over a connection, reset it (RST) — in the middle of a PullBlobs stream
  or an UploadResult when N is smaller than what the call moves.
  `hold_down_s` with `up_after` holds the server's answer that long before
  the reset, so a request reaches the server and its acknowledgement is lost.
- `reset_all()`: RST every open connection now.

`stats` counts connections accepted, refused and reset, and bytes each way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import struct


@dataclasses.dataclass(frozen=True, kw_only=True)
class Faults:
    """The standing faults of a proxy; the default relays faithfully."""

    refuse: bool = False
    stall: bool = False
    delay_s: float = 0.0
    up_bytes_per_s: float | None = None
    down_bytes_per_s: float | None = None
    chunk_bytes: int = 16 * 1024


@dataclasses.dataclass
class Stats:
    accepted: int = 0
    refused: int = 0
    resets: int = 0
    up_bytes: int = 0
    down_bytes: int = 0


@dataclasses.dataclass
class _Cut:
    """Reset the next connection that moves `after` more bytes in one direction (`down` or not)."""

    down: bool
    after: int
    hold_down_s: float = 0.0
    fired: bool = False
    base: dict[int, int] = dataclasses.field(default_factory=dict)  # id(link) -> bytes moved when set

    def due(self, link: _Link, size: int) -> bool:
        return not self.fired and link.moved[self.down] - self.base.get(id(link), 0) + size >= self.after


class _Link:
    """One relayed connection: the client's and the server's streams and the bytes moved over it."""

    def __init__(
        self,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.client = client
        self.server = server
        self.moved = {True: 0, False: 0}  # down?: bytes
        self.closed = False
        self.mute_down = False  # the server's answers are held (a lost acknowledgement)
        self.pumps: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        """RST both sides (SO_LINGER 0, then abort): the peers see a reset, not a clean close."""
        if self.closed:
            return
        self.closed = True
        for _, writer in (self.client, self.server):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for task in self.pumps:
            task.cancel()


class FaultProxy:
    """`address = await FaultProxy(("127.0.0.1", port)).start()`; point clients at `address`."""

    def __init__(self, upstream: tuple[str, int], faults: Faults = Faults()) -> None:
        self.upstream = upstream
        self.faults = faults
        self.stats = Stats()
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._cuts: list[_Cut] = []
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._server = await asyncio.start_server(self._accept, host, port)
        bound = self._server.sockets[0].getsockname()
        return f"{bound[0]}:{bound[1]}"

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.faults = Faults(refuse=True)  # connections waiting in a black hole are refused, not relayed
        self._flowing.set()
        self.reset_all(count=False)
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=5)

    # ------------------------------------------------------------ faults

    def set(self, faults: Faults) -> None:
        """Replace the standing faults; a refusal also resets what is open (a partition cuts live links)."""
        self.faults = faults
        if faults.stall:
            self._flowing.clear()
        else:
            self._flowing.set()
        if faults.refuse:
            self.reset_all()

    def heal(self) -> None:
        self.set(Faults())

    def cut(self, *, down_after: int | None = None, up_after: int | None = None, hold_down_s: float = 0.0) -> None:
        """Reset the next connection that moves this many more bytes down (or up): once."""
        for down, after in ((True, down_after), (False, up_after)):
            if after is not None:  # counted from now on the links already open
                base = {id(link): link.moved[down] for link in self._links}
                self._cuts.append(_Cut(down=down, after=after, hold_down_s=0.0 if down else hold_down_s, base=base))

    @property
    def pending_cuts(self) -> int:
        return sum(1 for c in self._cuts if not c.fired)

    def reset_all(self, *, count: bool = True) -> int:
        links = [link for link in self._links if not link.closed]
        for link in links:
            link.reset()
        if count:
            self.stats.resets += len(links)
        return len(links)

    @property
    def open_connections(self) -> int:
        return sum(1 for link in self._links if not link.closed)

    # ------------------------------------------------------------ relaying

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._relay(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.faults.refuse:
            self.stats.refused += 1
            _abort(writer)
            return
        self.stats.accepted += 1
        await self._flowing.wait()  # a black hole answers nothing, not even with a connection upstream
        if self.faults.refuse:  # the hole became a refusal meanwhile
            self.stats.refused += 1
            _abort(writer)
            return
        try:
            server = await asyncio.open_connection(*self.upstream)
        except OSError:
            _abort(writer)
            return
        link = _Link((reader, writer), server)
        self._links.add(link)
        link.pumps = [
            asyncio.create_task(self._pump(link, reader, server[1], down=False)),
            asyncio.create_task(self._pump(link, server[0], writer, down=True)),
        ]
        try:
            await asyncio.wait(link.pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in link.pumps:
                task.cancel()
            await asyncio.gather(*link.pumps, return_exceptions=True)
            if not link.closed:
                link.closed = True
                for w in (writer, server[1]):
                    w.close()
            self._links.discard(link)

    async def _pump(self, link: _Link, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, down: bool) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                await self._flowing.wait()
                data = await src.read(self.faults.chunk_bytes)
                if not data:
                    with contextlib.suppress(OSError):
                        dst.write_eof()
                    return
                await self._flowing.wait()  # stalled while reading: hold what was read
                faults = self.faults
                if faults.delay_s:
                    await asyncio.sleep(faults.delay_s)
                rate = faults.down_bytes_per_s if down else faults.up_bytes_per_s
                if rate:
                    await asyncio.sleep(len(data) / rate)
                if down and link.mute_down:
                    await asyncio.Event().wait()  # held until the reset cancels this pump
                cut = self._due_cut(link, down, len(data))
                if cut is not None and cut.hold_down_s:
                    # The request goes on reaching the server; its answers are held, then the link reset.
                    link.mute_down = True
                    asyncio.get_running_loop().call_later(cut.hold_down_s, self._reset, link)
                elif cut is not None:
                    keep = max(0, cut.after - (link.moved[down] - cut.base.get(id(link), 0)))
                    if keep:
                        dst.write(data[:keep])
                        await dst.drain()
                    link.moved[down] += keep
                    self._count(down, keep)
                    self._reset(link)
                    return
                dst.write(data)
                await dst.drain()
                link.moved[down] += len(data)
                self._count(down, len(data))

    def _reset(self, link: _Link) -> None:
        if not link.closed:
            self.stats.resets += 1
            link.reset()

    def _due_cut(self, link: _Link, down: bool, size: int) -> _Cut | None:
        for cut in self._cuts:
            if cut.down == down and cut.due(link, size):
                cut.fired = True
                return cut
        return None

    def _count(self, down: bool, n: int) -> None:
        if down:
            self.stats.down_bytes += n
        else:
            self.stats.up_bytes += n


def _abort(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
