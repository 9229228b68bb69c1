"""Blobs over HTTP(S) from an object store or CDN, by the short-lived URLs a manifest answer carries.

The controller hands out `GetManifestResponse.blob_urls` (presigned S3 GETs,
or per-device signed origin URLs). This room fetches one blob by URL into a
`pull.BlobWrite`, resuming its partial with a `Range` request, and says
whether it worked; the puller falls back to gRPC `PullBlobs` for every blob
it did not get, which resumes from the same partial. Nothing here is
trusted: the writer refuses bytes past the manifest's size and commits only
bytes hashing to the digest. What fails (and falls back):

- a status other than 200/206 (403 forged, 410 or 403 expired, 404), a 206
  for another range, a 200 that restarts the blob (the partial is dropped);
- a redirect loop (more than `max_redirects`), a server that stalls for
  `stall_s` between bytes, a connection that drops, a body that ends early
  (the partial is kept: gRPC resumes it);
- bytes that differ from the digest, or more bytes than declared (the
  partial is dropped: it cannot be that blob).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import ssl
from typing import TYPE_CHECKING, Protocol

from tether.common import errors, url_failures

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class Write(Protocol):
    """The part of `pull.BlobWrite` a fetch needs."""

    @property
    def digest(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def offset(self) -> int: ...

    def append(self, data: bytes, *, offset: int) -> None: ...

    async def commit(self) -> None: ...

    def close(self) -> None: ...

    def discard(self) -> None: ...


class HttpFailure(Exception):
    """A URL did not deliver its blob; `keep` says whether the partial may be resumed from.

    `reason`: one of `url_failures.REASONS`, reported to the controller with the next delivery report.
    """

    def __init__(self, message: str, *, keep: bool, reason: str) -> None:
        super().__init__(message)
        self.keep = keep
        self.reason = reason


@dataclasses.dataclass(frozen=True, kw_only=True)
class HttpSettings:
    max_parallel: int = 4  # blob fetches at once per device
    stall_s: float = 30.0  # no byte for this long: the server stalled
    connect_s: float = 10.0
    max_redirects: int = 5
    ca_file: str | None = None  # trust this CA (a private origin) besides the system's


class HttpFetcher:
    """Blob fetches over HTTP(S) for one device: bounded in number, each resumable."""

    def __init__(self, settings: HttpSettings | None = None, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.settings = settings or HttpSettings()
        # Built once and shared when given (a simulated fleet: one per process, not one per device); a
        # CA file is read now, so a bad one is an error at start (InvalidArgument), not at the first fetch.
        if ssl_context is None and self.settings.ca_file:
            ssl_context = tls_context(self.settings)
        self._ssl_context = ssl_context
        self._slots = asyncio.Semaphore(self.settings.max_parallel)
        self._client: httpx.AsyncClient | None = None
        self.fetched = 0  # blobs received and verified over HTTP
        self.failures = 0  # URLs that failed (each fell back to gRPC)

    def prepare(self) -> None:
        """Build the HTTP client now rather than at the first fetch (a simulated fleet, before it is timed)."""
        self._http()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            import httpx  # only a device that is handed URLs needs it loaded

            s = self.settings
            verify = self._ssl_context or tls_context(s)
            self._client = httpx.AsyncClient(
                follow_redirects=True,
                max_redirects=s.max_redirects,
                timeout=httpx.Timeout(s.stall_s, connect=s.connect_s),
                limits=httpx.Limits(max_connections=s.max_parallel * 2),
                verify=verify,
                headers={"Accept-Encoding": "identity"},
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def fetch(self, url: str, writer: Write) -> None:
        """The whole blob into `writer`, verified and committed; HttpFailure (or VerificationFailed) otherwise.

        Holds one of `max_parallel` slots while it runs. `writer` is closed or discarded on failure.
        """
        import httpx

        async with self._slots:
            try:
                await self._fetch(url, writer)
            except errors.DigestMismatch as e:  # wrong bytes: this partial can never become the blob
                writer.discard()
                self.failures += 1
                raise HttpFailure(
                    f"{_where(url)} served wrong bytes for {writer.digest}: {e}",
                    keep=False,
                    reason=url_failures.WRONG_BYTES,
                ) from None
            except HttpFailure as e:
                writer.close() if e.keep else writer.discard()
                self.failures += 1
                raise
            except (httpx.HTTPError, OSError) as e:  # timeouts (stalls), resets, redirect loops, protocol errors
                writer.close()
                self.failures += 1
                raise HttpFailure(f"{_where(url)}: {type(e).__name__}: {e}", keep=True, reason=_reason(e)) from None
            except BaseException:
                writer.close()
                raise
        self.fetched += 1

    async def _fetch(self, url: str, writer: Write) -> None:
        offset = writer.offset
        if offset < writer.size:
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            async with self._http().stream("GET", url, headers=headers) as response:
                _check_start(response.status_code, response.headers.get("content-range"), offset, writer)
                async for data in response.aiter_raw():
                    writer.append(data, offset=writer.offset)
            if writer.offset < writer.size:
                raise HttpFailure(
                    f"{_where(url)} ended {writer.digest} at {writer.offset} of {writer.size} bytes",
                    keep=True,
                    reason=url_failures.TRUNCATED,
                )
        await writer.commit()


def tls_context(settings: HttpSettings) -> ssl.SSLContext:
    """The system's trusted CAs, and `settings.ca_file`'s too (a private origin)."""
    context = ssl.create_default_context()
    if settings.ca_file:
        try:
            context.load_verify_locations(settings.ca_file)
        except (OSError, ssl.SSLError) as e:
            raise errors.InvalidArgument(f"CA file {settings.ca_file}: {e}") from None
    return context


def _check_start(status: int, content_range: str | None, offset: int, writer: Write) -> None:
    """The response continues the blob at `offset`, or the fetch fails (nothing written yet)."""
    if status == 206:
        match = _CONTENT_RANGE.match(content_range or "")
        if match is None or int(match.group(1)) != offset:
            raise HttpFailure(
                f"asked for {writer.digest} from {offset}, got range {content_range!r}",
                keep=True,
                reason=url_failures.BAD_RANGE,
            )
        if match.group(3) != "*" and int(match.group(3)) != writer.size:
            raise HttpFailure(
                f"{writer.digest} is {match.group(3)} bytes there; the manifest says {writer.size}",
                keep=False,
                reason=url_failures.WRONG_BYTES,
            )
        return
    if status == 200:
        if offset:
            raise HttpFailure(
                f"the server ignored the range of {writer.digest}: starting over",
                keep=False,
                reason=url_failures.BAD_RANGE,
            )
        return
    raise HttpFailure(f"HTTP {status} for {writer.digest}", keep=True, reason=url_failures.for_status(status))


def _reason(e: BaseException) -> str:
    """The reason of a transport error (httpx's or the OS's)."""
    import httpx

    if isinstance(e, httpx.TooManyRedirects):
        return url_failures.REDIRECTS
    if isinstance(e, httpx.ReadTimeout | httpx.WriteTimeout | httpx.PoolTimeout):
        return url_failures.STALLED
    if isinstance(e, httpx.ReadError | httpx.RemoteProtocolError):
        return url_failures.TRUNCATED
    return url_failures.CONNECTION


def _where(url: str) -> str:
    """A URL without its query (tokens stay out of logs)."""
    return url.split("?", 1)[0]
