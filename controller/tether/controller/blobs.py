"""Content-addressed blob storage: a bundle file's bytes, stored under its sha256.

A blob is visible only once it is complete and verified: bytes stream into a
temporary file while being hashed, the file is fsynced, and only a matching
digest is atomically renamed into place (then the directory is fsynced, so a
crash never leaves a half blob under a valid name). A mismatch, an oversized
stream or any error removes the temporary file and stores nothing.

`BlobStore` is the seam for other backends: `url_for` lets an object store or
CDN serve a blob directly later; the filesystem store returns None, meaning
"stream it through the controller". Methods are synchronous (file or SDK I/O);
async callers run them in a thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import BinaryIO, Protocol, runtime_checkable

from tether.common import errors, manifest

DEFAULT_MAX_BLOB_BYTES = 2 * 1024**3
DEFAULT_CHUNK_SIZE = 256 * 1024
_STALE_TEMP_S = 24 * 3600


@runtime_checkable
class BlobStore(Protocol):
    """Where blobs live. Implementations MUST make `put_stream` all-or-nothing."""

    max_blob_bytes: int

    def has(self, digest: str) -> bool:
        """True when the complete, verified blob is stored."""
        ...

    def size(self, digest: str) -> int | None:
        """Size in bytes of a stored blob, None when absent."""
        ...

    def put_stream(self, digest: str, chunks: Iterable[bytes]) -> int:
        """Store `chunks` under `digest`; return the size. Raises DigestMismatch / TooLarge, storing nothing."""
        ...

    def read_range(self, digest: str, *, offset: int = 0, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        """Chunks from `offset` to the end. NotFound when absent; InvalidArgument for a bad offset (checked eagerly)."""
        ...

    def url_for(self, digest: str) -> str | None:
        """A URL a device may fetch the blob from directly, or None to stream it through the controller."""
        ...


class FilesystemBlobStore:
    """Blobs as files under `root/sha256/ab/cd/<hex>` (fan-out keeps directories small)."""

    def __init__(self, root: pathlib.Path | str, *, max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES) -> None:
        self.root = pathlib.Path(root)
        self.max_blob_bytes = max_blob_bytes
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)
        self._remove_stale_temp_files()

    def path_for(self, digest: str) -> pathlib.Path:
        manifest.check_digest(digest)
        hex_ = digest.removeprefix("sha256:")
        return self.root / "sha256" / hex_[:2] / hex_[2:4] / hex_

    def has(self, digest: str) -> bool:
        return self.path_for(digest).is_file()

    def size(self, digest: str) -> int | None:
        try:
            return self.path_for(digest).stat().st_size
        except FileNotFoundError:
            return None

    def url_for(self, digest: str) -> str | None:
        return None

    def put_stream(self, digest: str, chunks: Iterable[bytes]) -> int:
        final = self.path_for(digest)
        h = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="put-", suffix=".part")
        tmp = pathlib.Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_blob_bytes:
                        raise errors.TooLarge(f"blob {digest} exceeds the limit of {self.max_blob_bytes} bytes")
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            actual = "sha256:" + h.hexdigest()
            if actual != digest:
                raise errors.DigestMismatch(f"digest: the content hashes to {actual}, not {digest}")
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)  # same content as any blob already there: replacing is harmless
            _fsync_dir(final.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return size

    def read_range(self, digest: str, *, offset: int = 0, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        path = self.path_for(digest)
        try:
            f = path.open("rb")
        except FileNotFoundError:
            raise errors.NotFound(f"blob {digest} is not stored") from None
        total = os.fstat(f.fileno()).st_size
        if not 0 <= offset <= total:
            f.close()
            raise errors.InvalidArgument(f"offset {offset} is outside blob {digest} of {total} bytes")
        if chunk_size <= 0:
            f.close()
            raise errors.InvalidArgument("chunk_size must be positive")
        return _chunks(f, offset=offset, chunk_size=chunk_size)

    def _remove_stale_temp_files(self) -> None:
        # Only old ones: another replica sharing this directory may be writing right now.
        cutoff = time.time() - _STALE_TEMP_S
        for p in self._tmp.glob("put-*.part"):
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < cutoff:
                    p.unlink()


def _chunks(f: BinaryIO, *, offset: int, chunk_size: int) -> Iterator[bytes]:
    with f:
        f.seek(offset)
        while chunk := f.read(chunk_size):
            yield chunk


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
