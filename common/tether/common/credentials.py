"""Signed, expiring device credentials: `v1.<device_id>.<expires>.<secret>.<sig>`.

The controller issues one to a device at enrolment and on renewal. It wraps
the registry credential (`<device_id>.<secret>`, `tether.common.auth`) with an
expiry and an HMAC-SHA256 signature under a controller key:

- The signature and the expiry are checked first, from the token alone: a
  forged, altered or expired token is refused without touching the database,
  so garbage cannot be used to load it.
- Then the registry decides: the device exists, is not revoked, and the
  secret is the one it holds (only sha256(secret) is stored, and it changes
  on every renewal, re-enrolment and revocation). A stolen key alone does not
  let anyone pose as a device, nor does a leaked database alone.

`expires` is a Unix time in whole seconds; the secret is URL-safe base64 and
the signature is URL-safe base64 without padding, so the token needs no
escaping in gRPC metadata. Device ids may contain dots, so the token is split
from the right.

Pure (hmac, hashlib, secrets): the agent imports it to read its own expiry.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import os
import pathlib
import re
import secrets
import time
from collections.abc import Callable, Sequence

from tether.common import auth, errors

VERSION = "v1"
_DOMAIN = b"tether-device-credential\x00"
MIN_KEY_BYTES = 32
MAX_KEYS = 16
DEFAULT_TTL_S = 7 * 24 * 3600
MIN_TTL_S = 60
MAX_TTL_S = 366 * 24 * 3600
_SIG_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")  # 32 bytes, unpadded URL-safe base64
_EXPIRES_RE = re.compile(r"^[0-9]{1,12}$")


@dataclasses.dataclass(frozen=True)
class DeviceToken:
    """A parsed (not yet verified) signed credential."""

    device_id: str
    expires_at: int
    secret: str
    signature: str

    @property
    def credential(self) -> auth.Credential:
        """The registry credential inside: what the store checks."""
        return auth.Credential(device_id=self.device_id, secret=self.secret)

    @property
    def signed_part(self) -> str:
        return f"{VERSION}.{self.device_id}.{self.expires_at}.{self.secret}"

    def __str__(self) -> str:
        return f"{self.signed_part}.{self.signature}"

    def __repr__(self) -> str:  # keep the secret out of logs and tracebacks
        return f"DeviceToken(device_id={self.device_id!r}, expires_at={self.expires_at}, secret=***)"


def parse(token: str) -> DeviceToken:
    """Split a token; Unauthenticated when it is not of the v1 form (no signature check here)."""
    if not isinstance(token, str) or len(token) > auth.MAX_TOKEN_LEN or not token.startswith(VERSION + "."):
        raise errors.Unauthenticated("malformed device credential: not a v1 signed credential (enrol again)")
    parts = token[len(VERSION) + 1 :].rsplit(".", 3)
    if len(parts) != 4:
        raise errors.Unauthenticated("malformed device credential")
    device_id, expires, secret, signature = parts
    if (
        not auth.DEVICE_ID_RE.match(device_id)
        or not _EXPIRES_RE.match(expires)
        or not auth.SECRET_RE.match(secret)
        or not _SIG_RE.match(signature)
    ):
        raise errors.Unauthenticated("malformed device credential")
    return DeviceToken(device_id=device_id, expires_at=int(expires), secret=secret, signature=signature)


def expires_at(token: str) -> int | None:
    """The expiry of a token this process holds (the agent plans renewal with it); None when it has none."""
    try:
        return parse(token).expires_at
    except errors.Unauthenticated:
        return None


def _mac(key: bytes, message: str) -> str:
    digest = hmac.new(key, _DOMAIN + message.encode("utf-8"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class Signer:
    """Issues and verifies signed credentials with a controller's keys.

    The first key signs; every key verifies, so a key can be rotated by
    putting the new one first and dropping the old one once every credential
    signed with it has expired or been renewed.
    """

    def __init__(
        self, keys: Sequence[bytes], *, ttl_s: int = DEFAULT_TTL_S, clock: Callable[[], float] = time.time
    ) -> None:
        if not keys:
            raise errors.InvalidArgument("at least one credential signing key is required")
        if len(keys) > MAX_KEYS:
            raise errors.InvalidArgument(f"at most {MAX_KEYS} credential signing keys, got {len(keys)}")
        for key in keys:
            if len(key) < MIN_KEY_BYTES:
                raise errors.InvalidArgument(f"a credential signing key must be at least {MIN_KEY_BYTES} bytes")
        if not MIN_TTL_S <= ttl_s <= MAX_TTL_S:
            raise errors.InvalidArgument(f"credential TTL must be in [{MIN_TTL_S}, {MAX_TTL_S}] seconds, got {ttl_s}")
        self._keys = tuple(bytes(k) for k in keys)
        self.ttl_s = int(ttl_s)
        self.clock = clock

    def issue(self, credential: auth.Credential, *, ttl_s: int | None = None) -> DeviceToken:
        """Sign `credential` (a fresh registry credential) to expire `ttl_s` from now."""
        auth.check_device_id(credential.device_id)
        expires = int(self.clock()) + int(self.ttl_s if ttl_s is None else ttl_s)
        unsigned = DeviceToken(
            device_id=credential.device_id, expires_at=expires, secret=credential.secret, signature=""
        )
        return dataclasses.replace(unsigned, signature=_mac(self._keys[0], unsigned.signed_part))

    def verify(self, token: str) -> DeviceToken:
        """Parse, check the signature, then the expiry; Unauthenticated with the reason otherwise."""
        parsed = parse(token)
        message = parsed.signed_part
        # Compare against every key (no early exit): timing says nothing about which key failed.
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(_mac(key, message), parsed.signature)
        if not ok:
            raise errors.Unauthenticated("device credential signature is invalid")
        now = self.clock()
        if parsed.expires_at <= now:
            raise errors.Unauthenticated(
                f"device credential of {parsed.device_id} expired {int(now - parsed.expires_at)}s ago; "
                "renew it or enrol again"
            )
        return parsed


def new_key() -> bytes:
    return secrets.token_bytes(MIN_KEY_BYTES)


def load_key_file(path: str | os.PathLike[str]) -> list[bytes]:
    """Keys from a file: one per line (hex, or any text of at least 32 bytes); the first signs.

    Blank lines and lines starting with `#` are ignored. A key given as 64+
    hex digits is decoded; anything else is used as its UTF-8 bytes.
    """
    path = pathlib.Path(path)
    try:
        text = path.read_text("utf-8")
    except OSError as e:
        raise errors.InvalidArgument(f"credential key file {path}: {e.strerror or e}") from None
    keys = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) >= 2 * MIN_KEY_BYTES and re.fullmatch(r"[0-9a-fA-F]+", line) and len(line) % 2 == 0:
            keys.append(bytes.fromhex(line))
        else:
            keys.append(line.encode("utf-8"))
    if not keys:
        raise errors.InvalidArgument(f"credential key file {path}: no key in it")
    for key in keys:
        if len(key) < MIN_KEY_BYTES:
            raise errors.InvalidArgument(
                f"credential key file {path}: every key must be at least {MIN_KEY_BYTES} bytes"
            )
    return keys
