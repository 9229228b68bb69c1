"""Which devices a release targets: the one selector grammar, parsed here for the operator and the controller.

A target document is Kubernetes label-selector shaped,

    {"matchLabels": {k: v},
     "matchExpressions": [{"key", "operator": In|NotIn|Exists|DoesNotExist, "values": [...]}],
     "matchVersions": {"appVersion": ">=10.2,<11"},      # tether.spec.versions
     "deviceIds": ["d1", "d2"],                           # an explicit cohort
     "exclude": [{selector}, ...]}                        # devices never targeted

and every clause must hold (AND); an empty document targets every device.
Rollout cohorts and exclusions are *selectors*: the same form without
`exclude`. Because a typo such as "matchLabel" would otherwise silently widen
a target to the whole fleet, unknown fields are refused rather than ignored,
and an exclusion or cohort that selects everything is refused too.

Devices are seen as *facts*: each key maps to a set of values. Ordinary
attributes are single-valued; pseudo attributes come from the controller's
registry: `tether.io/backend` (every engine backend that really runs on the
device, so `In` means "has any of"), `tether.io/selected-backend` and
`tether.io/device-id` (what `deviceIds` matches).

Why here: the MLTask's validation (operator, at `kubectl apply`) and the
release's validation (controller, at ApplyRelease) must accept exactly the same
targets, so both call `parse_target`. The operator adds the CRD's own, tighter
bounds on top (tether.operator.model); the controller keeps the normalised
`Target.document` it stores and compares.

Errors are `errors.InvalidSpec` naming the offending path. Map keys in a path
are written the caller's way (`keyed`): the controller writes
`target.matchLabels['os']`, the operator the YAML-ish `spec.target.matchVersions.appVersion`.

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Mapping
from typing import Any

from tether.common import errors
from tether.spec import versions

BACKEND_KEY = "tether.io/backend"
SELECTED_BACKEND_KEY = "tether.io/selected-backend"
DEVICE_ID_KEY = "tether.io/device-id"

MAX_LABELS = 64
MAX_EXPRESSIONS = 64
MAX_VALUES = 10_000  # an explicit cohort of device ids can be long
MAX_KEY_LEN = 253
MAX_VALUE_LEN = 256
MAX_DEVICE_IDS = 10_000
MAX_EXCLUDES = 16
KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?$")
SELECTOR_FIELDS = ("matchLabels", "matchExpressions", "matchVersions", "deviceIds")
TARGET_FIELDS = (*SELECTOR_FIELDS, "exclude")

Facts = Mapping[str, frozenset[str]]
KeyPath = Callable[[str, str], str]


def subscript(field: str, key: str) -> str:
    """`target.matchLabels['os']`: the controller's (and the wire's) way of naming a map entry."""
    return f"{field}[{errors.excerpt(key)}]"


def dotted(field: str, key: str) -> str:
    """`spec.target.matchVersions.appVersion`: the MLTask's (YAML's) way of naming a map entry."""
    return f"{field}.{key if len(key) <= errors.MAX_EXCERPT_CHARS else errors.excerpt(key)}"


class Operator(enum.StrEnum):
    """How a match expression relates a device attribute to its values."""

    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


@dataclasses.dataclass(frozen=True)
class Requirement:
    key: str
    operator: Operator
    values: frozenset[str] = frozenset()

    def matches(self, facts: Facts) -> bool:
        have = facts.get(self.key)
        match self.operator:
            case Operator.IN:
                return have is not None and not have.isdisjoint(self.values)
            case Operator.NOT_IN:  # as in Kubernetes: a missing key is "not in"
                return have is None or have.isdisjoint(self.values)
            case Operator.EXISTS:
                return have is not None
            case Operator.DOES_NOT_EXIST:
                return have is None


@dataclasses.dataclass(frozen=True)
class Target:
    """A validated target (or selector, when `exclude` is empty and it came from `parse_selector`).

    `requirements` holds matchLabels (as In of one value) and matchExpressions;
    `document` is the normalised JSON form (empty parts dropped, values sorted)
    that is stored and compared, so equivalent spellings do not bump a version.
    """

    requirements: tuple[Requirement, ...] = ()
    document: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)
    # matchVersions: (attribute, range) pairs; the attribute must parse as a version inside the range.
    versions: tuple[tuple[str, versions.VersionRange], ...] = ()
    # deviceIds: an explicit list of devices (None: no such restriction).
    device_ids: frozenset[str] | None = None
    # exclude: selectors of devices that are never targeted, whatever else matches.
    exclude: tuple[Target, ...] = ()

    def matches(self, facts: Facts) -> bool:
        return self.selects(facts) and not any(e.selects(facts) for e in self.exclude)

    def selects(self, facts: Facts) -> bool:
        """Every clause holds (exclusions not considered)."""
        if self.device_ids is not None and facts.get(DEVICE_ID_KEY, frozenset()).isdisjoint(self.device_ids):
            return False
        for key, allowed in self.versions:
            if not any(allowed.contains(v) for v in facts.get(key, ())):
                return False
        return all(r.matches(facts) for r in self.requirements)

    @property
    def matches_everything(self) -> bool:
        return not self.requirements and not self.versions and self.device_ids is None and not self.exclude


# ---------------------------------------------------------------- parsing


def parse_target(doc: Any, *, field: str = "target", keyed: KeyPath = subscript) -> Target:
    """Validate a target document; `errors.InvalidSpec` names the offending path.

    Besides matchLabels and matchExpressions a target may carry `matchVersions`,
    `deviceIds` and `exclude` (a list of selectors whose devices are never
    targeted). An exclusion that selects everything is refused: it would
    silently empty the target.
    """
    return _parse(doc, field=field, keyed=keyed, allowed=TARGET_FIELDS)


def parse_selector(doc: Any, *, field: str, keyed: KeyPath = subscript) -> Target:
    """A selector (a cohort, an exclusion): a target without `exclude`."""
    return _parse(doc, field=field, keyed=keyed, allowed=SELECTOR_FIELDS)


def _parse(doc: Any, *, field: str, keyed: KeyPath, allowed: tuple[str, ...]) -> Target:
    if doc is None:
        return Target()
    if not isinstance(doc, dict):
        raise errors.InvalidSpec("must be an object with matchLabels and/or matchExpressions", field=field)
    unknown = set(doc) - set(allowed)
    if unknown:
        raise errors.InvalidSpec(f"unknown fields {sorted(unknown)}; allowed are {sorted(allowed)}", field=field)
    normalized: dict[str, Any] = {}
    labels = _parse_labels(doc.get("matchLabels"), field=f"{field}.matchLabels", keyed=keyed)
    if labels:
        normalized["matchLabels"] = labels
    requirements = [Requirement(key=k, operator=Operator.IN, values=frozenset((v,))) for k, v in labels.items()]
    expressions = _parse_expressions(doc.get("matchExpressions"), field=f"{field}.matchExpressions")
    if expressions:
        normalized["matchExpressions"] = [
            {"key": r.key, "operator": r.operator.value, **({"values": sorted(r.values)} if r.values else {})}
            for r in expressions
        ]
    version_ranges = _parse_versions(doc.get("matchVersions"), field=f"{field}.matchVersions", keyed=keyed)
    if version_ranges:
        normalized["matchVersions"] = {k: str(r) for k, r in version_ranges}
    device_ids = _parse_device_ids(doc.get("deviceIds"), field=f"{field}.deviceIds")
    if device_ids is not None:
        normalized["deviceIds"] = sorted(device_ids)
    exclude = _parse_exclude(doc.get("exclude"), field=f"{field}.exclude", keyed=keyed)
    if exclude:
        normalized["exclude"] = [dict(e.document) for e in exclude]
    return Target(
        requirements=(*requirements, *expressions),
        document=normalized,
        versions=version_ranges,
        device_ids=device_ids,
        exclude=exclude,
    )


def _parse_labels(doc: Any, *, field: str, keyed: KeyPath) -> dict[str, str]:
    labels = {} if doc is None else doc
    if not isinstance(labels, dict):
        raise errors.InvalidSpec("must be an object of key: value strings", field=field)
    if len(labels) > MAX_LABELS:
        raise errors.InvalidSpec(f"{len(labels)} labels; the limit is {MAX_LABELS}", field=field)
    for key, value in sorted(labels.items()):
        where = keyed(field, key)
        check_key(key, field=where)
        check_value(value, field=where)
    return dict(sorted(labels.items()))


def _parse_expressions(doc: Any, *, field: str) -> list[Requirement]:
    expressions = [] if doc is None else doc
    if not isinstance(expressions, list):
        raise errors.InvalidSpec("must be a list", field=field)
    if len(expressions) > MAX_EXPRESSIONS:
        raise errors.InvalidSpec(f"{len(expressions)} expressions; the limit is {MAX_EXPRESSIONS}", field=field)
    return [_parse_expression(expr, field=f"{field}[{i}]") for i, expr in enumerate(expressions)]


def _parse_expression(expr: Any, *, field: str) -> Requirement:
    if not isinstance(expr, dict):
        raise errors.InvalidSpec("must be an object with key, operator and values", field=field)
    unknown = set(expr) - {"key", "operator", "values"}
    if unknown:
        raise errors.InvalidSpec(f"unknown fields {sorted(unknown)}", field=field)
    key: Any = expr.get("key")
    check_key(key, field=f"{field}.key")
    raw_op: Any = expr.get("operator")
    try:
        op = Operator(raw_op)
    except ValueError:
        allowed = ", ".join(o.value for o in Operator)
        raise errors.InvalidSpec(
            f"{errors.excerpt(raw_op)} is not one of {allowed}", field=f"{field}.operator"
        ) from None
    values = expr.get("values")
    if values is None:
        values = []
    if not isinstance(values, list):
        raise errors.InvalidSpec("must be a list of strings", field=f"{field}.values")
    if len(values) > MAX_VALUES:
        raise errors.InvalidSpec(f"{len(values)} values; the limit is {MAX_VALUES}", field=f"{field}.values")
    for j, value in enumerate(values):
        check_value(value, field=f"{field}.values[{j}]")
    if op in (Operator.IN, Operator.NOT_IN) and not values:
        raise errors.InvalidSpec(f"operator {op.value} needs at least one value", field=f"{field}.values")
    if op in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and values:
        raise errors.InvalidSpec(f"must be empty: operator {op.value} takes no values", field=f"{field}.values")
    return Requirement(key=key, operator=op, values=frozenset(values))


def _parse_versions(doc: Any, *, field: str, keyed: KeyPath) -> tuple[tuple[str, versions.VersionRange], ...]:
    if doc is None:
        return ()
    if not isinstance(doc, dict):
        raise errors.InvalidSpec("must be an object of attribute: version range", field=field)
    if len(doc) > MAX_LABELS:
        raise errors.InvalidSpec(f"{len(doc)} ranges; the limit is {MAX_LABELS}", field=field)
    out = []
    for key, text in sorted(doc.items()):
        where = keyed(field, key)
        check_key(key, field=where)
        out.append((key, versions.parse_range(text, field=where)))
    return tuple(out)


def _parse_device_ids(doc: Any, *, field: str) -> frozenset[str] | None:
    if doc is None:
        return None
    if not isinstance(doc, list) or not doc:
        raise errors.InvalidSpec("must be a non-empty list of device ids", field=field)
    if len(doc) > MAX_DEVICE_IDS:
        raise errors.InvalidSpec(f"{len(doc)} device ids; the limit is {MAX_DEVICE_IDS}", field=field)
    for j, value in enumerate(doc):
        check_value(value, field=f"{field}[{j}]")
    return frozenset(doc)


def _parse_exclude(doc: Any, *, field: str, keyed: KeyPath) -> tuple[Target, ...]:
    if doc is None:
        return ()
    if not isinstance(doc, list):
        raise errors.InvalidSpec("must be a list of selectors", field=field)
    if len(doc) > MAX_EXCLUDES:
        raise errors.InvalidSpec(f"{len(doc)} selectors; the limit is {MAX_EXCLUDES}", field=field)
    out = []
    for i, sel in enumerate(doc):
        where = f"{field}[{i}]"
        parsed = parse_selector(sel, field=where, keyed=keyed)
        if parsed.matches_everything:
            raise errors.InvalidSpec("an empty selector would exclude every device", field=where)
        out.append(parsed)
    return tuple(out)


def check_key(key: Any, *, field: str) -> None:
    """An attribute key as targets name it (also what the controller accepts as a device attribute)."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LEN or not KEY_RE.match(key):
        raise errors.InvalidSpec(
            f"key {errors.excerpt(key)} must be 1-{MAX_KEY_LEN} characters of letters, digits and . _ / -", field=field
        )


def check_value(value: Any, *, field: str) -> None:
    if not isinstance(value, str) or len(value) > MAX_VALUE_LEN:
        raise errors.InvalidSpec(
            f"value {errors.excerpt(value)} must be a string of at most {MAX_VALUE_LEN} characters", field=field
        )
