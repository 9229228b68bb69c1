"""Short-lived, per-device blob URLs for a static origin or CDN: signed tokens a web server checks (pure).

The token is the one nginx's `secure_link` module checks (and that CDNs with
URL signing accept in the same shape: an expiry and a keyed hash in the query):

    <base>/sha256/ab/cd/<hex>?md5=<token>&expires=<unix s>&device=<device id>
    token = base64url(md5("<expires><path><device> <secret>")), unpadded

with, on the origin (docs/internals.md has the whole server block):

    secure_link $arg_md5,$arg_expires;
    secure_link_md5 "$secure_link_expires$uri$arg_device <secret>";

A forged or altered URL (another blob, another device, a later expiry) and an
expired one are refused by the origin (403 / 410), before any byte is read.
The device id in the URL makes each device's URL its own (the origin's access
log names who fetched what); the device verifies every byte against the
blob's digest anyway, so a URL needs no trust on the device's side.

The layout under the base URL is the filesystem store's (`sha256/ab/cd/<hex>`),
so a web server can serve the controller's blob directory as it is, and an
object store keyed the same way can sit behind a CDN.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import math
import urllib.parse

from tether.common import errors

MIN_TTL_S = 60
MAX_TTL_S = 7 * 24 * 3600  # S3's own bound for presigned URLs
MIN_SECRET_LEN = 16


def blob_path(digest: str) -> str:
    """`sha256/ab/cd/<hex>`: where a blob lives under a base URL, a bucket prefix or a directory."""
    algorithm, _, hex_ = digest.partition(":")
    if algorithm != "sha256" or len(hex_) != 64 or any(c not in "0123456789abcdef" for c in hex_):
        raise errors.InvalidArgument(f"malformed blob digest {digest!r}")
    return f"sha256/{hex_[:2]}/{hex_[2:4]}/{hex_}"


def expiry(*, now: float, ttl_s: int) -> int:
    """The Unix second a URL issued now stops working."""
    return math.ceil(now) + ttl_s


@dataclasses.dataclass(frozen=True, kw_only=True)
class OriginSigner:
    """Signs URLs under `base_url` for the origin that shares `secret`."""

    base_url: str
    secret: str
    ttl_s: int = 900

    def __post_init__(self) -> None:
        parsed = urllib.parse.urlsplit(self.base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.query or parsed.fragment:
            raise errors.InvalidArgument(f"blob base URL {self.base_url!r} must be http(s)://host[:port]/path/")
        if len(self.secret) < MIN_SECRET_LEN or any(c.isspace() for c in self.secret):
            raise errors.InvalidArgument(f"blob URL secret must be at least {MIN_SECRET_LEN} characters without spaces")
        if not MIN_TTL_S <= self.ttl_s <= MAX_TTL_S:
            raise errors.InvalidArgument(
                f"blob URL TTL must be between {MIN_TTL_S} and {MAX_TTL_S} s, got {self.ttl_s}"
            )

    def url(self, digest: str, *, device_id: str, now: float) -> str:
        base = self.base_url if self.base_url.endswith("/") else self.base_url + "/"
        path = urllib.parse.urlsplit(base).path + blob_path(digest)
        expires = expiry(now=now, ttl_s=self.ttl_s)
        device = urllib.parse.quote(device_id, safe="")
        query = urllib.parse.urlencode({"md5": token(path=path, expires=expires, device=device, secret=self.secret)})
        return f"{base}{blob_path(digest)}?{query}&expires={expires}&device={device}"


def token(*, path: str, expires: int, device: str, secret: str) -> str:
    """nginx `secure_link_md5 "$secure_link_expires$uri$arg_device <secret>"`, as `secure_link` expects it."""
    raw = hashlib.md5(f"{expires}{path}{device} {secret}".encode(), usedforsecurity=False).digest()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def check(url: str, *, secret: str, now: float) -> bool:
    """What the origin checks (the reference for other servers, and for tests): authentic and not expired."""
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    # nginx's $arg_device is the raw (still percent-encoded) value.
    pairs = (p.split("=", 1) for p in parts.query.split("&") if "=" in p)
    raw_device = next((v for k, v in pairs if k == "device"), "")
    try:
        expires = int(query.get("expires", ""))
    except ValueError:
        return False
    expected = token(path=urllib.parse.unquote(parts.path), expires=expires, device=raw_device, secret=secret)
    return hmac.compare_digest(expected, query.get("md5", "")) and now < expires
