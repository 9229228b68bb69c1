"""JSON text from outside the process, decoded with every failure as a ValueError. Pure: no I/O.

`json.loads` refuses most bad input with a ValueError (`JSONDecodeError`, or
an integer of more than 4300 digits), but a deeply nested document
(`[[[[...]]]]`, a few kilobytes) makes its scanner raise RecursionError,
which no caller expected: the fuzzers found it crashing the manifest decoder
and the controller's ReleaseSpec parser. Every decoder of untrusted JSON
goes through `loads`, so one `except ValueError` catches them all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def loads(text: str | bytes, *, parse_constant: Callable[[str], Any] | None = None) -> Any:
    """`json.loads`, raising ValueError (never RecursionError) for what it cannot decode."""
    try:
        return json.loads(text, parse_constant=parse_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None
