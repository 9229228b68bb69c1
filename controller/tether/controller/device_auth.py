"""Authenticating device calls: signed credential first, then the registry (briefly cached).

Every device RPC but `Enroll` presents `authorization: Bearer <credential>`
(`tether.common.credentials`). `authenticate`:

1. checks the HMAC signature and the expiry from the token alone: a forged,
   altered, truncated or expired credential is refused before any database
   work, so it cannot be used to load the database;
2. asks the registry (`DeviceRegistry.authenticate_device`) whether the device exists,
   is not revoked and holds this secret, and keeps the answer for
   `cache_s` seconds (bounded LRU), so a busy device costs one query per
   `cache_s`, not one per call.

A positive answer is cached under the sha256 of the secret, so a renewed or
re-enrolled credential (a new secret) misses the cache and is checked again,
on this replica or any other. A change of a device's credential or facts
(re-enrolment, renewal, ReportBackends) is announced by Postgres (migration
0009) and every replica `forget`s the device, so a superseded credential or
stale attributes are not answered from another replica's entry either.

Revocation is not bounded by `cache_s`: a revocation made anywhere (any
replica, or psql) is announced by Postgres when it commits (migration 0008,
`tether.controller.replicas`), and every replica `forget`s the device at once
and ends its stream. While a replica's LISTEN connection is down it may miss
that announcement, so on reconnect it `clear`s the whole cache and re-checks
its connected devices: only during such a gap does the `cache_s` bound apply.

A lookup that was in flight when its device was forgotten (or the cache
cleared) may carry an answer read before the revocation committed: it is
neither cached nor returned, the registry is asked again. `authenticate`
returns without yielding to the event loop after that check, so a Subscribe
registers its stream in the hub before any later revocation is processed
(which then finds the stream and ends it).

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
from tether.controller import devices
from tether.controller.storage import contracts

log = logging.getLogger(__name__)

KEY_NAME = "device-credential-hmac-v1"
DEFAULT_CACHE_S = 60.0
DEFAULT_CACHE_SIZE = 100_000
MAX_LOOKUPS = 4  # registry lookups per call when the device is forgotten meanwhile (then UNAVAILABLE)


class _Busy(errors.TetherError):
    code = "UNAVAILABLE"


@dataclasses.dataclass(frozen=True)
class _Entry:
    secret_hash: bytes
    device: devices.Device
    at: float


class DeviceAuthenticator:
    def __init__(
        self,
        *,
        registry: contracts.DeviceRegistry,
        signer: credentials.Signer,
        cache_s: float = DEFAULT_CACHE_S,
        cache_size: int = DEFAULT_CACHE_SIZE,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self.signer = signer
        self._cache_s = cache_s
        self._cache_size = cache_size
        self._monotonic = monotonic
        self._cache: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        # Registry lookups in flight, per device: how many, and how often the device was forgotten
        # meanwhile (an answer read before a forget may predate a revocation). Empty when idle.
        self._inflight: dict[str, int] = {}
        self._forgotten: dict[str, int] = {}

    async def authenticate(self, token: str) -> devices.Device:
        parsed = self.signer.verify(token)  # signature and expiry: no database work for garbage
        credential = parsed.credential
        device_id = parsed.device_id
        secret_hash = credential.secret_hash
        now = self._monotonic()
        hit = self._cache.get(device_id)
        if hit is not None and hit.secret_hash == secret_hash and now - hit.at < self._cache_s:
            self._cache.move_to_end(device_id)
            return hit.device
        self._inflight[device_id] = self._inflight.get(device_id, 0) + 1
        self._forgotten.setdefault(device_id, 0)
        try:
            for _ in range(MAX_LOOKUPS):
                forgotten = self._forgotten[device_id]
                device = await self._lookup(credential)
                if self._forgotten[device_id] == forgotten:
                    break  # nothing was revoked or renewed while we asked: the answer is current
            else:
                raise _Busy(f"the credential of device {device_id} keeps changing; retry")
        finally:
            left = self._inflight[device_id] - 1
            if left:
                self._inflight[device_id] = left
            else:
                del self._inflight[device_id], self._forgotten[device_id]
        # No await from here on: the caller acts on the answer (Subscribe: hub.connect) before any
        # revocation announced later is processed.
        if self._cache_s > 0:
            self._cache[device_id] = _Entry(secret_hash=secret_hash, device=device, at=now)
            self._cache.move_to_end(device_id)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return device

    async def _lookup(self, credential: auth.Credential) -> devices.Device:
        try:
            return await self._registry.authenticate_device(credential)
        except errors.Unauthenticated as e:
            self.forget(credential.device_id)
            if "revoked" in str(e):
                raise
            # Validly signed, yet not the secret the registry holds: renewed or re-enrolled since.
            raise errors.Unauthenticated(
                f"credential of device {credential.device_id} is no longer valid (superseded by a renewal or "
                "re-enrolment, or the device is unknown); enrol again"
            ) from None

    def issue(self, credential: auth.Credential) -> credentials.DeviceToken:
        """Sign a fresh registry credential; the device's cached entry (old secret) is dropped."""
        self.forget(credential.device_id)
        return self.signer.issue(credential)

    def forget(self, device_id: str) -> None:
        """Drop the device's cached answer (revoked, renewed, re-enrolled); lookups in flight ask again."""
        self._cache.pop(device_id, None)
        if device_id in self._forgotten:
            self._forgotten[device_id] += 1

    def clear(self) -> None:
        """Forget every device (revocations may have been missed: the replica's LISTEN connection was down)."""
        self._cache.clear()
        for device_id in self._forgotten:
            self._forgotten[device_id] += 1

    @property
    def cached(self) -> int:
        """Devices with a cached answer (not `__len__`: an empty authenticator must stay truthy)."""
        return len(self._cache)


async def signer_for(
    *, registry: contracts.DeviceRegistry, key_file: str | None, ttl_s: int, clock: Callable[[], float] = time.time
) -> credentials.Signer:
    """The signer of this controller: keys from `key_file`, else the key shared through Postgres."""
    if key_file:
        keys = credentials.load_key_file(key_file)
        log.info("device credentials signed with %d key(s) from %s", len(keys), key_file)
    else:
        keys = [await registry.controller_secret(KEY_NAME, generate=credentials.new_key)]
    return credentials.Signer(keys, ttl_s=ttl_s, clock=clock)
