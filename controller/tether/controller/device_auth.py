"""Authenticating device calls: signed credential first, then the registry (briefly cached).

Every device RPC but `Enroll` presents `authorization: Bearer <credential>`
(`tether.common.credentials`). `authenticate`:

1. checks the HMAC signature and the expiry from the token alone: a forged,
   altered, truncated or expired credential is refused before any database
   work, so it cannot be used to load the database;
2. asks the registry (`Store.authenticate_device`) whether the device exists,
   is not revoked and holds this secret, and keeps the answer for
   `cache_s` seconds (bounded LRU), so a busy device costs one query per
   `cache_s`, not one per call.

A positive answer is cached under the sha256 of the secret, so a renewed or
re-enrolled credential (a new secret) misses the cache and is checked again.
Enrolment, renewal and revocation on this process drop the device's entry
at once; on other replicas an entry lives at most `cache_s` (the bound on
how long a revoked device can still make a call there).

Failures raise `errors.Unauthenticated` with a message that says why
(malformed, bad signature, expired, revoked, superseded) but never which
part of a secret was wrong.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable

from tether.common import auth, credentials, errors
from tether.controller import devices, store

log = logging.getLogger(__name__)

KEY_NAME = "device-credential-hmac-v1"
DEFAULT_CACHE_S = 5.0
DEFAULT_CACHE_SIZE = 100_000


@dataclasses.dataclass(frozen=True)
class _Entry:
    secret_hash: bytes
    device: devices.Device
    at: float


class DeviceAuthenticator:
    def __init__(
        self,
        *,
        store_: store.Store,
        signer: credentials.Signer,
        cache_s: float = DEFAULT_CACHE_S,
        cache_size: int = DEFAULT_CACHE_SIZE,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store_
        self.signer = signer
        self._cache_s = cache_s
        self._cache_size = cache_size
        self._monotonic = monotonic
        self._cache: collections.OrderedDict[str, _Entry] = collections.OrderedDict()

    async def authenticate(self, token: str) -> devices.Device:
        parsed = self.signer.verify(token)  # signature and expiry: no database work for garbage
        credential = parsed.credential
        secret_hash = credential.secret_hash
        now = self._monotonic()
        hit = self._cache.get(parsed.device_id)
        if hit is not None and hit.secret_hash == secret_hash and now - hit.at < self._cache_s:
            self._cache.move_to_end(parsed.device_id)
            return hit.device
        try:
            device = await self._store.authenticate_device(credential)
        except errors.Unauthenticated as e:
            self.forget(parsed.device_id)
            if "revoked" in str(e):
                raise
            # Validly signed, yet not the secret the registry holds: renewed or re-enrolled since.
            raise errors.Unauthenticated(
                f"credential of device {parsed.device_id} is no longer valid (superseded by a renewal or "
                "re-enrolment, or the device is unknown); enrol again"
            ) from None
        if self._cache_s > 0:
            self._cache[parsed.device_id] = _Entry(secret_hash=secret_hash, device=device, at=now)
            self._cache.move_to_end(parsed.device_id)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return device

    def issue(self, credential: auth.Credential) -> credentials.DeviceToken:
        """Sign a fresh registry credential; the device's cached entry (old secret) is dropped."""
        self.forget(credential.device_id)
        return self.signer.issue(credential)

    def forget(self, device_id: str) -> None:
        self._cache.pop(device_id, None)


async def signer_for(
    *, store_: store.Store, key_file: str | None, ttl_s: int, clock: Callable[[], float] = time.time
) -> credentials.Signer:
    """The signer of this controller: keys from `key_file`, else the key shared through Postgres."""
    if key_file:
        keys = credentials.load_key_file(key_file)
        log.info("device credentials signed with %d key(s) from %s", len(keys), key_file)
    else:
        keys = [await store_.controller_secret(KEY_NAME, generate=credentials.new_key)]
    return credentials.Signer(keys, ttl_s=ttl_s, clock=clock)
