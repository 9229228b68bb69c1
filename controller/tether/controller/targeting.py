"""Which devices a release targets, as the controller evaluates it: device facts against the shared selector.

The selector grammar (matchLabels, matchExpressions, matchVersions,
deviceIds, exclude), its parser and its matching semantics live in
`tether.spec.selectors`, shared with the operator's validation so both accept
exactly the same targets. What stays here is the controller's side of it:

- `device_facts`: what a device is matched on. Each key maps to a set of
  values; ordinary attributes are single-valued, and the registry adds pseudo
  attributes a device cannot spoof through its reported attributes:
  `tether.io/backend` (every engine backend that really runs on the device,
  so `In` means "has any of"), `tether.io/selected-backend` (the backends its
  backend selection chose) and `tether.io/device-id` (what `deviceIds`
  matches);
- `parse_stored`: stored (already validated) documents parsed once, cached,
  since every Sync and status re-reads them.

Pure: no I/O.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from typing import Any

from tether.spec.selectors import (
    BACKEND_KEY,
    DEVICE_ID_KEY,
    SELECTED_BACKEND_KEY,
    Facts,
    Target,
    parse_target,
)


def device_facts(
    *,
    device_id: str,
    attributes: Mapping[str, str],
    backends: Iterable[str] = (),
    selected_backends: Iterable[str] = (),
) -> Facts:
    """The facts a target is evaluated against; pseudo attributes win over reported ones.

    `selected_backends`: the "<engine>/<backend>" the device's backend selection
    chose for its models (`tether.io/selected-backend`, so `In` means "runs
    some model on one of").
    """
    facts: dict[str, frozenset[str]] = {k: frozenset((v,)) for k, v in attributes.items()}
    facts[DEVICE_ID_KEY] = frozenset((device_id,))
    for key, values in ((BACKEND_KEY, frozenset(backends)), (SELECTED_BACKEND_KEY, frozenset(selected_backends))):
        if values:
            facts[key] = values
        else:
            facts.pop(key, None)
    return facts


def matches(target: Target, *, device_id: str, attributes: Mapping[str, str], backends: Iterable[str] = ()) -> bool:
    return target.matches(device_facts(device_id=device_id, attributes=attributes, backends=backends))


@functools.lru_cache(maxsize=1024)
def _parse_canonical(text: str) -> Target:
    return parse_target(json.loads(text))


def parse_stored(doc: Mapping[str, Any] | None) -> Target:
    """`parse_target` of a stored (already validated) document, cached: every Sync and status re-reads them."""
    return _parse_canonical(json.dumps(doc or {}, sort_keys=True, separators=(",", ":")))
