"""The rows of a memory storage (`memory`), shared by its four stores as one database's tables would be."""

from __future__ import annotations

import dataclasses
import time

from tether.controller import devices, uploads
from tether.controller.fl.rounds import Round, RoundResult, UpdateRecord
from tether.controller.releases import Release
from tether.controller.storage import contracts


@dataclasses.dataclass
class DeviceRow:
    device_id: str
    credential_hash: bytes
    attributes: dict[str, str]
    backends: tuple[str, ...]
    revoked: bool = False
    backend_choices: tuple[devices.BackendChoice, ...] = ()
    fingerprint: str = ""
    state: dict[str, str] = dataclasses.field(default_factory=dict)
    last_seen: float = 0.0
    connected_replica: str = ""  # the replica holding its stream; "": none

    def device(self) -> devices.Device:
        return devices.Device(
            device_id=self.device_id,
            attributes=dict(self.attributes),
            backends=self.backends,
            revoked=self.revoked,
            backend_choices=self.backend_choices,
        )


@dataclasses.dataclass(frozen=True)
class DeliveryRow:
    version: int
    state: str
    message: str = ""
    installed_at: float | None = None  # epoch seconds
    updated_at: float = dataclasses.field(default_factory=time.time)  # epoch seconds: every write is a new row


@dataclasses.dataclass
class Tables:
    """Every row of a memory storage, by primary key."""

    devices: dict[str, DeviceRow] = dataclasses.field(default_factory=dict)
    secrets: dict[str, bytes] = dataclasses.field(default_factory=dict)
    blobs: dict[str, int] = dataclasses.field(default_factory=dict)
    manifests: dict[str, contracts.StoredManifest] = dataclasses.field(default_factory=dict)
    releases: dict[str, Release] = dataclasses.field(default_factory=dict)  # deleted ones too
    deliveries: dict[tuple[str, str], DeliveryRow] = dataclasses.field(default_factory=dict)  # (release, device)
    results: dict[tuple[str, str], uploads.ResultRecord] = dataclasses.field(default_factory=dict)  # (device, key)
    rounds: dict[tuple[str, int], Round] = dataclasses.field(default_factory=dict)  # (task, number)
    round_updates: dict[tuple[str, int, str], tuple[UpdateRecord, bool]] = dataclasses.field(
        default_factory=dict
    )  # (task, number, device) -> (update, accepted)
    round_results: dict[tuple[str, int], RoundResult] = dataclasses.field(default_factory=dict)
