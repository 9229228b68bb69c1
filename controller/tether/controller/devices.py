"""What a device may tell the registry about itself: bounded, validated attributes.

Attributes drive targeting, so they are checked like any other network input:
bounded counts and lengths, keys in label form, and no attribute may pose as
one of the registry's pseudo attributes (`tether.io/...`), which would let a
device put itself into someone else's explicit cohort.

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping

from tether.common import errors
from tether.controller import targeting

MAX_ATTRIBUTES = 64
MAX_BACKENDS = 32
MAX_BACKEND_LEN = 64
RESERVED_PREFIX = "tether.io/"
_BACKEND_RE = re.compile(r"^[a-z0-9][a-z0-9._+/-]{0,63}$")


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    attributes: Mapping[str, str]
    backends: tuple[str, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Device:
    """A registered device as the registry knows it."""

    device_id: str
    attributes: Mapping[str, str]
    backends: tuple[str, ...] = ()
    revoked: bool = False

    @property
    def facts(self) -> targeting.Facts:
        return targeting.device_facts(device_id=self.device_id, attributes=self.attributes, backends=self.backends)


def validate_info(*, attributes: Mapping[str, str], backends: Iterable[str]) -> DeviceInfo:
    if len(attributes) > MAX_ATTRIBUTES:
        raise errors.TooLarge(f"device.attributes: {len(attributes)} entries; the limit is {MAX_ATTRIBUTES}")
    for key, value in attributes.items():
        if (
            not key or len(key) > targeting.MAX_KEY_LEN or not targeting.KEY_RE.match(key)  # the grammar targets use
        ):
            raise errors.InvalidArgument(f"device.attributes: key {key[:64]!r} is not a valid label key")
        if key.startswith(RESERVED_PREFIX):
            raise errors.InvalidArgument(f"device.attributes: key {key!r} uses the reserved prefix {RESERVED_PREFIX}")
        if len(value) > targeting.MAX_VALUE_LEN:
            raise errors.InvalidArgument(
                f"device.attributes[{key!r}]: value longer than {targeting.MAX_VALUE_LEN} characters"
            )
    backend_list = list(dict.fromkeys(backends))
    if len(backend_list) > MAX_BACKENDS:
        raise errors.TooLarge(f"device.backends: {len(backend_list)} entries; the limit is {MAX_BACKENDS}")
    for b in backend_list:
        if not _BACKEND_RE.match(b):
            raise errors.InvalidArgument(f"device.backends: {b[:64]!r} must look like 'engine/backend' in lowercase")
    return DeviceInfo(attributes=dict(sorted(attributes.items())), backends=tuple(backend_list))
