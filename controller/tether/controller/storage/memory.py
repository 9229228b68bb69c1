"""The storage in memory: the same four Protocols, for tests of logic that has no SQL and single processes.

One `Tables` object holds every aggregate's rows, as one database would; the
four stores share it, so checks that cross aggregates (a release needs its
manifest; a result needs its release and moves a delivery) see one state.
Each method runs without awaiting in between its checks and its writes, so
on one event loop it is as atomic as a Postgres transaction: a refused call
changes nothing. The rules are the pure ones the Postgres storage applies
(`deliveries`, `serving`, `rollouts`, `uploads.refusal`), so the contract
tests hold both to the same behaviour.

No announcements: a memory storage is one process, nothing to tell other replicas.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable

from tether.common import auth, errors, manifest
from tether.controller import deliveries, devices, uploads
from tether.controller.storage import contracts, memory_releases, memory_rounds
from tether.controller.storage.memory_tables import DeliveryRow, DeviceRow, Tables


class MemoryDevices:
    def __init__(self, tables: Tables) -> None:
        self._t = tables

    async def enroll_device(self, *, device_id: str, info: devices.DeviceInfo) -> auth.Credential:
        auth.check_device_id(device_id)
        credential = auth.Credential(device_id=device_id, secret=auth.new_secret())
        row = self._t.devices.get(device_id)
        if row is not None and row.revoked:
            raise errors.PermissionDenied(f"device {device_id} is revoked and cannot re-enrol")
        if row is None:
            row = self._t.devices[device_id] = DeviceRow(
                device_id=device_id, credential_hash=b"", attributes={}, backends=()
            )
        row.credential_hash = credential.secret_hash
        row.attributes = dict(info.attributes)
        row.backends = tuple(info.backends)
        row.last_seen = time.time()
        return credential

    async def authenticate_device(self, credential: auth.Credential) -> devices.Device:
        row = self._t.devices.get(credential.device_id)
        if row is None or not auth.secret_matches(credential.secret, row.credential_hash):
            raise errors.Unauthenticated("unknown device or wrong credential")
        if row.revoked:
            raise errors.Unauthenticated(f"device {credential.device_id} is revoked")
        return row.device()

    async def device(self, device_id: str) -> devices.Device | None:
        row = self._t.devices.get(device_id)
        return None if row is None else row.device()

    async def set_backend_choices(
        self,
        *,
        device_id: str,
        choices: Iterable[devices.BackendChoice],
        fingerprint: str,
        backends: Iterable[str],
    ) -> None:
        row = self._t.devices.get(device_id)
        if row is not None:
            row.backend_choices = tuple(choices)
            row.fingerprint = fingerprint[:128]
            row.backends = tuple(backends)
            row.last_seen = time.time()

    async def touch_device(self, device_id: str) -> None:
        row = self._t.devices.get(device_id)
        if row is not None:
            row.last_seen = time.time()

    async def device_connected(self, device_id: str, replica_id: str) -> None:
        row = self._t.devices.get(device_id)
        if row is not None:
            row.last_seen = time.time()
            row.connected_replica = replica_id

    async def device_disconnected(self, device_id: str, replica_id: str) -> None:
        row = self._t.devices.get(device_id)
        if row is not None and row.connected_replica == replica_id:
            row.last_seen = time.time()
            row.connected_replica = ""

    async def revoke_device(self, device_id: str) -> bool:
        row = self._t.devices.get(device_id)
        if row is None:
            raise errors.NotFound(f"device {device_id} is not enrolled")
        if row.revoked:
            return False
        row.revoked = True
        return True

    async def not_live(self, device_ids: Iterable[str]) -> set[str]:
        wanted = set(device_ids)
        return {d for d in wanted if d not in self._t.devices or self._t.devices[d].revoked}

    async def rotate_credential(self, device_id: str) -> auth.Credential:
        auth.check_device_id(device_id)
        credential = auth.Credential(device_id=device_id, secret=auth.new_secret())
        row = self._t.devices.get(device_id)
        if row is None or row.revoked:
            raise errors.Unauthenticated(f"device {device_id} is revoked or not enrolled")
        row.credential_hash = credential.secret_hash
        row.last_seen = time.time()
        return credential

    async def controller_secret(self, name: str, *, generate: Callable[[], bytes]) -> bytes:
        if name not in self._t.secrets:
            self._t.secrets[name] = generate()
        return self._t.secrets[name]

    async def active_devices(self) -> list[devices.Device]:
        return [row.device() for _, row in sorted(self._t.devices.items()) if not row.revoked]

    async def list_devices(
        self, *, after: str = "", limit: int, include_revoked: bool = False
    ) -> list[devices.InventoryEntry]:
        rows = [r for i, r in sorted(self._t.devices.items()) if i > after and (include_revoked or not r.revoked)]
        out = []
        for row in rows[: max(limit, 0)]:
            delivered = sorted(
                devices.DeviceRelease(release=rel, version=d.version, state=d.state)
                for (rel, dev), d in self._t.deliveries.items()
                if dev == row.device_id
            )
            out.append(
                devices.InventoryEntry(
                    device=row.device(),
                    last_seen=row.last_seen or None,
                    releases=tuple(delivered),
                    device_state=dict(row.state),
                    connected_replica=row.connected_replica,  # one process: its replica is alive
                )
            )
        return out


class MemoryBundles:
    def __init__(self, tables: Tables) -> None:
        self._t = tables

    async def put_blob(self, *, digest: str, size: int) -> None:
        manifest.check_digest(digest)
        self._t.blobs.setdefault(digest, size)

    async def blob_sizes(self, digests: Iterable[str]) -> dict[str, int]:
        return {d: self._t.blobs[d] for d in dict.fromkeys(digests) if d in self._t.blobs}

    async def put_manifest(self, *, body: bytes, signature: bytes = b"", key_id: str = "") -> str:
        parsed = manifest.Manifest.from_bytes(body)
        digest = manifest.sha256_digest(body)
        missing = [d for d in parsed.blob_digests() if d not in self._t.blobs]
        if missing:
            raise errors.FailedPrecondition(
                f"manifest references {len(missing)} blob(s) not uploaded yet, e.g. {missing[0]}"
            )
        for f in parsed.files:
            if self._t.blobs[f.sha256] != f.size:
                raise errors.InvalidManifest(
                    f"files: {f.path} claims {f.size} bytes but blob {f.sha256} has {self._t.blobs[f.sha256]}"
                )
        if digest not in self._t.manifests or signature:
            self._t.manifests[digest] = contracts.StoredManifest(
                digest=digest, body=bytes(body), signature=bytes(signature), key_id=key_id
            )
        return digest

    async def get_manifest(self, digest: str) -> contracts.StoredManifest | None:
        return self._t.manifests.get(digest)


class MemoryResults:
    def __init__(self, tables: Tables) -> None:
        self._t = tables

    async def insert_result(self, *, device: devices.Device, record: uploads.ResultRecord) -> contracts.InsertOutcome:
        t = self._t
        existing = t.results.get((device.device_id, record.idempotency_key))
        if existing is not None:
            return contracts.InsertOutcome(duplicate=True, release=existing.release, version=existing.version)
        refused = uploads.refusal(t.releases.get(record.release), device=device, record=record)
        if refused is not None:
            raise refused
        t.results[(device.device_id, record.idempotency_key)] = record
        key = (record.release, device.device_id)
        stored = t.deliveries.get(key)
        if stored is None:
            t.deliveries[key] = DeliveryRow(version=record.version, state="succeeded")
        elif deliveries.result_moves(stored_version=stored.version, stored_state=stored.state, version=record.version):
            t.deliveries[key] = dataclasses.replace(
                stored, version=record.version, state="succeeded", message="", updated_at=time.time()
            )
        row = self._t.devices.get(device.device_id)
        if row is not None:
            row.last_seen = time.time()
        return contracts.InsertOutcome(duplicate=False, release=record.release, version=record.version)


def memory_storage(tables: Tables | None = None) -> contracts.Storage:
    """A fresh, empty storage in memory (or over `tables`, shared with another one)."""
    tables = tables or Tables()
    return contracts.Storage(
        devices=MemoryDevices(tables),
        bundles=MemoryBundles(tables),
        releases=memory_releases.MemoryReleases(tables),
        results=MemoryResults(tables),
        rounds=memory_rounds.MemoryRounds(tables),
    )
