"""Per-run limits a release asks of devices (MLTask `spec.resources`), one typed value for every side.

    {"timeoutSeconds": 1..86400, "memoryMB": 16..65536, "cpuSeconds": 1..86400}

Every key is optional: an absent one leaves the device's own cap (an agent
runs a task under the smaller of the release's limit and its cap). The
operator fills `timeoutSeconds` and `memoryMB` from the CRD's defaults; the
controller stores the document as given and hands it to agents in
`DesiredTask.resources_json`.

Why here: the operator builds the value, the controller validates it, and
the wire carries it as a typed message (tether.spec.wire) or, from older
clients, as JSON; `parse_resources` is the one set of rules for all of them.
Errors are `errors.InvalidSpec` naming the key. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from tether.common import errors

# Inclusive bounds by camelCase key.
BOUNDS: Mapping[str, tuple[int, int]] = {
    "timeoutSeconds": (1, 24 * 3600),
    "memoryMB": (16, 64 * 1024),
    "cpuSeconds": (1, 24 * 3600),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Resources:
    """Limits of one run; None: the device's own cap."""

    timeout_seconds: int | None = None
    memory_mb: int | None = None
    cpu_seconds: int | None = None

    def to_json(self) -> dict[str, int]:
        """The document form: camelCase keys, only the limits that are set."""
        doc = {"timeoutSeconds": self.timeout_seconds, "memoryMB": self.memory_mb, "cpuSeconds": self.cpu_seconds}
        return {k: v for k, v in doc.items() if v is not None}


def _key_field(field: str, key: Any) -> str:
    """`resources.gpus` for a plain name; `resources[':']` (quoted, bounded) for anything else."""
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", key):
        return f"{field}.{key}"
    return f"{field}[{errors.excerpt(key)}]"


def parse_resources(doc: Mapping[str, Any] | None, *, field: str = "resources") -> Resources:
    """Only the known limits, each an integer within its bounds."""
    doc = doc or {}
    for key, value in doc.items():
        bounds = BOUNDS.get(key)
        if bounds is None:
            raise errors.InvalidSpec(f"unknown key; allowed are {sorted(BOUNDS)}", field=_key_field(field, key))
        low, high = bounds
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise errors.InvalidSpec(
                f"must be an integer in [{low}, {high}], got {errors.excerpt(value)}", field=f"{field}.{key}"
            )
    return Resources(
        timeout_seconds=doc.get("timeoutSeconds"), memory_mb=doc.get("memoryMB"), cpu_seconds=doc.get("cpuSeconds")
    )
