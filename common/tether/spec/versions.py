"""Version numbers and version ranges, for targeting devices by app or OS version.

A version is dot-separated numbers with an optional pre-release suffix:
`10`, `10.2`, `10.2.3`, `11.0.0-beta.1`. Missing components count as zero
(`10.2` == `10.2.0`), and a pre-release sorts before its release
(`11.0.0-beta` < `11.0.0`), as in semantic versioning. A leading `v` is allowed.

A range is comma-separated clauses, all of which must hold:
`>=10.2,<11`, `==12.1`, `!=10.4.1`, `>10`. Operators: `>=`, `>`, `<=`, `<`,
`==`, `!=`. A range that no version can satisfy (`>=11,<10`) is refused, so a
typo cannot silently empty a target.

Used by both sides: the operator validates ranges in an MLTask spec, the
controller evaluates them against the versions devices report. A device whose
attribute is missing or not a version never matches a range.

Pure: no I/O. Invalid input raises `errors.InvalidSpec` naming the field.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Callable

from tether.common import errors

MAX_RANGE_LEN = 256
MAX_CLAUSES = 8
_VERSION_RE = re.compile(r"^v?(\d{1,9}(?:\.\d{1,9}){0,5})(?:-([0-9A-Za-z.-]{1,64}))?$")
_CLAUSE_RE = re.compile(r"^(>=|<=|==|!=|>|<)\s*(\S+)$")
_OPS: dict[str, Callable[[Version, Version], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}


@dataclasses.dataclass(frozen=True, order=True)
class Version:
    """A comparable version: numeric release part, then pre-release (none sorts last)."""

    release: tuple[int, ...]
    # (0, parts) for a pre-release, (1, ()) for a release: pre-releases sort first.
    pre: tuple[int, tuple[tuple[int, int | str], ...]]

    def __str__(self) -> str:
        text = ".".join(str(p) for p in self.release)
        if self.pre[0] == 0:
            text += "-" + ".".join(str(v) for _, v in self.pre[1])
        return text


def parse_version(text: str) -> Version | None:
    """The version `text` spells, or None when it is not a version."""
    if not isinstance(text, str):
        return None
    m = _VERSION_RE.match(text.strip())
    if m is None:
        return None
    parts = [int(p) for p in m.group(1).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()  # 10.2.0 == 10.2
    suffix = m.group(2)
    if suffix is None:
        return Version(tuple(parts), (1, ()))
    pre = tuple((0, int(p)) if p.isdigit() else (1, p) for p in suffix.split("."))
    return Version(tuple(parts), (0, pre))


@dataclasses.dataclass(frozen=True)
class Clause:
    op: str
    version: Version

    def holds(self, v: Version) -> bool:
        return _OPS[self.op](v, self.version)

    def __str__(self) -> str:
        return f"{self.op}{self.version}"


@dataclasses.dataclass(frozen=True)
class VersionRange:
    """A conjunction of clauses; `str()` is the normalised spelling that is stored and compared."""

    clauses: tuple[Clause, ...]

    def contains(self, text: str) -> bool:
        v = parse_version(text)
        return v is not None and all(c.holds(v) for c in self.clauses)

    def __str__(self) -> str:
        return ",".join(str(c) for c in self.clauses)


def parse_range(text: object, *, field: str) -> VersionRange:
    """Parse a range such as `>=10.2,<11`; `errors.InvalidSpec` names `field` when it is malformed or empty."""
    if not isinstance(text, str) or not text.strip():
        raise errors.InvalidSpec(
            f"must be a version range such as '>=10.2,<11', got {errors.excerpt(text)}", field=field
        )
    if len(text) > MAX_RANGE_LEN:
        raise errors.InvalidSpec(f"longer than {MAX_RANGE_LEN} characters", field=field)
    raw = [c.strip() for c in text.split(",")]
    if len(raw) > MAX_CLAUSES:
        raise errors.InvalidSpec(f"{len(raw)} clauses; the limit is {MAX_CLAUSES}", field=field)
    clauses = []
    for part in raw:
        m = _CLAUSE_RE.match(part)
        if m is None:
            raise errors.InvalidSpec(
                f"clause {errors.excerpt(part)} must be an operator (>=, >, <=, <, ==, !=) followed by a version",
                field=field,
            )
        version = parse_version(m.group(2))
        if version is None:
            raise errors.InvalidSpec(
                f"{errors.excerpt(m.group(2))} in clause {errors.excerpt(part)} is not a version like 10.2.3",
                field=field,
            )
        clauses.append(Clause(m.group(1), version))
    result = VersionRange(tuple(clauses))
    if not satisfiable(result):
        raise errors.InvalidSpec(
            f"{errors.excerpt(text)} can never match: its clauses contradict each other", field=field
        )
    return result


def satisfiable(r: VersionRange) -> bool:
    """Whether some version lies in `r` (checked on the interval the clauses bound)."""
    low: tuple[Version, bool] | None = None  # (bound, inclusive)
    high: tuple[Version, bool] | None = None
    exact: set[Version] = set()
    excluded: set[Version] = set()
    for c in r.clauses:
        if c.op in (">=", ">"):
            bound = (c.version, c.op == ">=")
            if low is None or bound[0] > low[0] or (bound[0] == low[0] and not bound[1]):
                low = bound
        elif c.op in ("<=", "<"):
            bound = (c.version, c.op == "<=")
            if high is None or bound[0] < high[0] or (bound[0] == high[0] and not bound[1]):
                high = bound
        elif c.op == "==":
            exact.add(c.version)
        else:
            excluded.add(c.version)
    if len(exact) > 1:
        return False
    if exact:
        (v,) = exact
        return all(c.holds(v) for c in r.clauses)
    if low is not None and high is not None:
        if low[0] > high[0]:
            return False
        if low[0] == high[0]:
            return low[1] and high[1] and low[0] not in excluded
    return True  # an open interval holds infinitely many versions; finitely many are excluded
