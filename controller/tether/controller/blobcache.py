"""A bounded in-memory cache of blob chunks in front of the blob store, for PullBlob.

During a rollout every targeted device pulls the same few blobs. Blobs are
content-addressed, hence immutable, so caching their chunks is always correct;
without a cache each chunk costs a file open, a read and several thread hops
per device. The cache holds whole, aligned chunks (offsets that are multiples
of the chunk size) up to `max_bytes` in LRU order; a pull resumed at an
unaligned offset first reads up to the next boundary, then continues aligned.
Sizes of blobs are remembered too (immutable as well).

Memory is bounded by `max_bytes` plus one chunk per pull in flight.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator

from tether.common import errors
from tether.controller import blobs, blobstores

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
_MAX_SIZES = 65536


class ChunkCache:
    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES, chunk_size: int = blobs.DEFAULT_CHUNK_SIZE) -> None:
        if chunk_size <= 0 or max_bytes < 0:
            raise errors.InvalidArgument("chunk_size must be positive and max_bytes non-negative")
        self.max_bytes = max_bytes
        self.chunk_size = chunk_size
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._chunks: collections.OrderedDict[tuple[str, int], bytes] = collections.OrderedDict()
        self._sizes: collections.OrderedDict[str, int] = collections.OrderedDict()

    def get(self, digest: str, offset: int) -> bytes | None:
        data = self._chunks.get((digest, offset))
        if data is not None:
            self._chunks.move_to_end((digest, offset))
            self.hits += 1
        else:
            self.misses += 1
        return data

    def put(self, digest: str, offset: int, data: bytes) -> None:
        if len(data) > self.max_bytes or (digest, offset) in self._chunks:
            return
        self._chunks[(digest, offset)] = data
        self.bytes += len(data)
        while self.bytes > self.max_bytes:
            _, old = self._chunks.popitem(last=False)
            self.bytes -= len(old)

    async def size(self, store: blobstores.BlobBackend, digest: str) -> int | None:
        size = self._sizes.get(digest)
        if size is None:
            size = await store.size(digest)
            if size is None:
                return None
            self._sizes[digest] = size
            while len(self._sizes) > _MAX_SIZES:
                self._sizes.popitem(last=False)
        return size

    async def chunks(
        self, store: blobstores.BlobBackend, digest: str, *, offset: int, total: int
    ) -> AsyncIterator[bytes]:
        """The blob's bytes from `offset` to `total`, one chunk (at most `chunk_size`) at a time."""
        if not 0 <= offset <= total:
            raise errors.InvalidArgument(f"offset {offset} is outside blob {digest} of {total} bytes")
        position = offset
        while position < total:
            aligned = position % self.chunk_size == 0
            data = self.get(digest, position) if aligned else None
            if data is None:
                end = min(total, (position // self.chunk_size + 1) * self.chunk_size)
                data = await store.read(digest, offset=position, length=end - position)
                if not data:
                    raise errors.NotFound(f"blob {digest} ended at {position}, before its {total} bytes")
                if aligned and len(data) == end - position:
                    self.put(digest, position, data)
            yield data
            position += len(data)
