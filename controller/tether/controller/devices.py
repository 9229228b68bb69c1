"""What a device may tell the registry about itself: bounded, validated attributes.

Attributes drive targeting, so they are checked like any other network input:
bounded counts and lengths, keys in label form, and no attribute may pose as
one of the registry's pseudo attributes (`tether.io/...`), which would let a
device put itself into someone else's explicit cohort.

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from tether.common import errors
from tether.controller import targeting
from tether.spec import selectors

MAX_ATTRIBUTES = 64
MAX_BACKENDS = 32
MAX_BACKEND_LEN = 64
RESERVED_PREFIX = "tether.io/"
_BACKEND_RE = re.compile(r"^[a-z0-9][a-z0-9._+/-]{0,63}$")
MAX_CHOICES = 64
_CANDIDATE_RE = re.compile(r"^[a-z0-9][a-z0-9._+-]{0,31}/[a-z0-9][a-z0-9._+-]{0,31}/t[0-9]{1,3}/[A-Za-z0-9]{1,16}$")
_MODEL_KEY_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    attributes: Mapping[str, str]
    backends: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class BackendChoice:
    """How the device runs one model, as its backend selection chose it (ReportBackends)."""

    model_key: str
    candidate: str  # "<engine>/<backend>/t<threads>/<precision>"
    latency_ms: float
    release: str = ""
    model: str = ""

    @property
    def backend(self) -> str:
        """ "<engine>/<backend>" of the candidate."""
        return "/".join(self.candidate.split("/")[:2])

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> BackendChoice:
        return cls(
            model_key=str(doc.get("model_key", "")),
            candidate=str(doc.get("candidate", "")),
            latency_ms=float(doc.get("latency_ms") or 0.0),
            release=str(doc.get("release", "")),
            model=str(doc.get("model", "")),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Device:
    """A registered device as the registry knows it."""

    device_id: str
    attributes: Mapping[str, str]
    backends: tuple[str, ...] = ()
    revoked: bool = False
    backend_choices: tuple[BackendChoice, ...] = ()

    @functools.cached_property
    def facts(self) -> selectors.Facts:
        """What targets are evaluated against; computed once per Device (the authenticator caches Devices)."""
        return targeting.device_facts(
            device_id=self.device_id,
            attributes=self.attributes,
            backends=self.backends,
            selected_backends=[c.backend for c in self.backend_choices],
        )


@dataclasses.dataclass(frozen=True, order=True)
class DeviceRelease:
    """What a device was last delivered of one release."""

    release: str
    version: int
    state: str


@dataclasses.dataclass(frozen=True)
class InventoryEntry:
    """One device of the inventory (`ListDevices`)."""

    device: Device
    last_seen: float | None  # epoch seconds; None: never
    releases: tuple[DeviceRelease, ...] = ()  # ordered by release name
    # The participation state it reported last (charging / unmeteredNetwork / idle: true, false or unknown;
    # batteryLevel; waiting: the releases it holds back and why).
    device_state: Mapping[str, str] = dataclasses.field(default_factory=dict)
    connected_replica: str = ""  # the live controller replica holding its stream; "": none


# A replica's LISTEN session names itself so (truncated to Postgres' 63 characters): the inventory shows a
# device's connected replica only while that session is alive, so a replica that died is never shown.
LISTENER_APP_PREFIX = "tether-listener-"


def listener_application_name(replica_id: str) -> str:
    return f"{LISTENER_APP_PREFIX}{replica_id}"[:63]


MAX_PAGE = 1000


MAX_FINGERPRINT_CHARS = 128


def validate_fingerprint(fingerprint: str) -> str:
    """A ReportBackends fingerprint: at most 128 characters (longer is cut, as stored), no NUL."""
    if "\x00" in fingerprint:  # Postgres text cannot hold NUL: refused here, not as an internal error
        raise errors.InvalidArgument("fingerprint: must not contain NUL characters")
    return fingerprint[:MAX_FINGERPRINT_CHARS]


def validate_choices(choices: Iterable[Mapping[str, Any]]) -> tuple[BackendChoice, ...]:
    """A ReportBackends set: bounded, each candidate in selection's spelling, latencies finite."""
    out: list[BackendChoice] = []
    for i, doc in enumerate(choices):
        if i >= MAX_CHOICES:
            raise errors.TooLarge(f"choices: more than {MAX_CHOICES} entries")
        c = BackendChoice.from_json(doc)
        field = f"choices[{i}]"
        if not _MODEL_KEY_RE.match(c.model_key):
            raise errors.InvalidArgument(f"{field}.model_key: must be sha256:<64 hex>")
        if not _CANDIDATE_RE.match(c.candidate):
            raise errors.InvalidArgument(f"{field}.candidate: {c.candidate[:64]!r} is not engine/backend/tN/precision")
        if not (math.isfinite(c.latency_ms) and 0 <= c.latency_ms <= 3_600_000):
            raise errors.InvalidArgument(f"{field}.latency_ms: must be a finite number of milliseconds")
        if len(c.release) > 253 or len(c.model) > 1024:
            raise errors.InvalidArgument(f"{field}: release or model name too long")
        for name, value in (("release", c.release), ("model", c.model)):
            if "\x00" in value:  # Postgres text and jsonb cannot hold NUL
                raise errors.InvalidArgument(f"{field}.{name}: must not contain NUL characters")
        out.append(c)
    return tuple(out)


def validate_info(*, attributes: Mapping[str, str], backends: Iterable[str]) -> DeviceInfo:
    if len(attributes) > MAX_ATTRIBUTES:
        raise errors.TooLarge(f"device.attributes: {len(attributes)} entries; the limit is {MAX_ATTRIBUTES}")
    for key, value in attributes.items():
        if (
            not key or len(key) > selectors.MAX_KEY_LEN or not selectors.KEY_RE.match(key)  # the grammar targets use
        ):
            raise errors.InvalidArgument(f"device.attributes: key {key[:64]!r} is not a valid label key")
        if key.startswith(RESERVED_PREFIX):
            raise errors.InvalidArgument(f"device.attributes: key {key!r} uses the reserved prefix {RESERVED_PREFIX}")
        if len(value) > selectors.MAX_VALUE_LEN:
            raise errors.InvalidArgument(
                f"device.attributes[{key!r}]: value longer than {selectors.MAX_VALUE_LEN} characters"
            )
    backend_list = list(dict.fromkeys(backends))
    if len(backend_list) > MAX_BACKENDS:
        raise errors.TooLarge(f"device.backends: {len(backend_list)} entries; the limit is {MAX_BACKENDS}")
    for b in backend_list:
        if not _BACKEND_RE.match(b):
            raise errors.InvalidArgument(f"device.backends: {b[:64]!r} must look like 'engine/backend' in lowercase")
    return DeviceInfo(attributes=dict(sorted(attributes.items())), backends=tuple(backend_list))
