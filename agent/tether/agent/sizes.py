"""Sizes as people write them (`500MB`, `2GiB`, `unlimited`) and as the agent prints them. Pure.

Apart from the bundle store so the CLI (`--disk-budget`, `tether agent disk`)
and the disk-budget planning read and print sizes the same way without
touching files.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from tether.common import errors

# Bounded by default: a device's disk is small and shared with its owner's data. Bundles of on-device
# models are megabytes to a few hundred; 1 GiB holds a few of them plus a rollback copy each.
DEFAULT_DISK_BUDGET = 1024**3
ENV_DISK_BUDGET = "TETHER_AGENT_DISK_BUDGET"

_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)")
_UNITS = {
    "": 1,
    "b": 1,
    **{p + "b": 1000**n for n, p in enumerate("kmgt", 1)},
    **{p: 1024**n for n, p in enumerate("kmgt", 1)},
    **{p + "i": 1024**n for n, p in enumerate("kmgt", 1)},
    **{p + "ib": 1024**n for n, p in enumerate("kmgt", 1)},
}


def parse_size(text: str | int, *, what: str = "disk budget") -> int | None:
    """Bytes of a size such as `500MB`, `2GiB`, `1.5G` or `1048576`; None for `unlimited` (or `none`).

    kB, MB, GB, TB are powers of 1000; KiB, MiB, GiB, TiB (also Ki.. and bare K, M, G, T, as systemd
    and Docker read them) are powers of 1024. Units are case-insensitive. InvalidArgument when it is
    not a size, or not more than 0.
    """
    prefix = f"{what}: " if what else ""
    if isinstance(text, int) and not isinstance(text, bool):
        raw = str(text)
    elif isinstance(text, str):
        raw = text
    else:
        raise errors.InvalidArgument(f"{prefix}{text!r} is not a size")
    value = raw.strip().lower()
    if value in {"unlimited", "none"}:
        return None
    match = _SIZE.fullmatch(value)
    if match is None:
        raise errors.InvalidArgument(
            f"{prefix}{raw!r} is not a size; use a number of bytes with an optional unit "
            "(500MB, 2GiB, 1048576) or 'unlimited'"
        )
    number, unit = match.groups()
    if unit not in _UNITS:
        raise errors.InvalidArgument(
            f"{prefix}unknown unit {unit!r} in {raw!r}; use B, kB, MB, GB, TB (powers of 1000) "
            "or KiB, MiB, GiB, TiB (powers of 1024)"
        )
    try:
        n = int(Decimal(number) * _UNITS[unit])
    except InvalidOperation:
        raise errors.InvalidArgument(f"{prefix}{raw!r} is not a size") from None
    if n <= 0:
        raise errors.InvalidArgument(f"{prefix}{raw!r} must be more than 0 bytes ('unlimited' for no budget)")
    return n


def format_size(n: int) -> str:
    """`1 GiB`, `500 MB`, `476.8 MiB`, `12 B`: exact when it is a whole number of a unit."""
    n = int(n)
    binary = [("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)]
    decimal = [("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("kB", 1000)]
    for unit, base in binary + decimal:
        if n >= base and n % base == 0:
            return f"{n // base} {unit}"
    for unit, base in binary:
        if n >= base:
            return f"{n / base:.1f} {unit}"
    return f"{n} B"
