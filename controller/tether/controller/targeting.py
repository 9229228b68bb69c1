"""Which devices a release targets: Kubernetes-style label selectors over device attributes.

A target document is
`{"matchLabels": {k: v}, "matchExpressions": [{"key", "operator", "values"}]}`
with operators In | NotIn | Exists | DoesNotExist; every clause must hold (AND).
An empty document targets every device. A target may also carry
`matchVersions` (`{"appVersion": ">=10.2,<11"}`, tether.spec.versions),
`deviceIds` (an explicit list) and `exclude` (selectors whose devices are
never targeted); rollout cohorts use the same selector form.

Devices are seen as *facts*: each key maps to a set of values. Ordinary
attributes are single-valued; three pseudo attributes come from the registry:
`tether.io/backend` (every engine backend that really runs on the device, e.g.
"mnn/cpu", so `In` means "has any of"), `tether.io/selected-backend` (the
backends the device's backend selection chose for its models) and
`tether.io/device-id` (explicit cohorts and exclusions by id). Because a
typo such as "matchLabel" would otherwise silently widen a target to the
whole fleet, unknown fields are refused rather than ignored.

Pure: no I/O. Validation raises `errors.InvalidSpec` naming the field.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from tether.common import errors
from tether.spec import versions as versions_mod

BACKEND_KEY = "tether.io/backend"
SELECTED_BACKEND_KEY = "tether.io/selected-backend"
DEVICE_ID_KEY = "tether.io/device-id"

MAX_LABELS = 64
MAX_EXPRESSIONS = 64
MAX_VALUES = 10_000  # an explicit cohort of device ids can be long
MAX_KEY_LEN = 253
MAX_VALUE_LEN = 256
MAX_DOCUMENT_BYTES = 1024 * 1024
KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?$")

Facts = Mapping[str, frozenset[str]]


class Operator(enum.StrEnum):
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
    """A validated target.

    `requirements` holds matchLabels (as In of one value) and matchExpressions;
    `document` is the normalised JSON form (empty parts dropped, values sorted)
    that is stored and compared, so equivalent spellings do not bump a version.
    """

    requirements: tuple[Requirement, ...] = ()
    document: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)
    # matchVersions: (attribute, range) pairs; the attribute must parse as a version inside the range.
    versions: tuple[tuple[str, versions_mod.VersionRange], ...] = ()
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


# ---------------------------------------------------------------- validation


def parse_target_json(text: str, *, field: str = "target") -> Target:
    """Parse and validate a target document sent as JSON text (empty text = every device)."""
    if not text.strip():
        return Target()
    if len(text.encode("utf-8")) > MAX_DOCUMENT_BYTES:
        raise errors.InvalidSpec(f"document larger than {MAX_DOCUMENT_BYTES} bytes", field=field)
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:  # JSONDecodeError, or NaN/Infinity
        raise errors.InvalidSpec(f"not valid JSON: {e}", field=field) from None
    return parse_target(doc, field=field)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


SELECTOR_EXTRAS = ("matchVersions", "deviceIds")
MAX_DEVICE_IDS = 10_000
MAX_EXCLUDES = 16


def parse_target(doc: Any, *, field: str = "target", _nested: bool = False) -> Target:
    """Validate a target document; `errors.InvalidSpec` names the offending path.

    Besides matchLabels and matchExpressions a target may carry `matchVersions`
    (`{attribute: ">=10.2,<11"}`), `deviceIds` (an explicit cohort) and
    `exclude` (a list of selectors of the same form, without `exclude`, whose
    devices are never targeted). An exclusion that selects everything is
    refused: it would silently empty the target.
    """
    if doc is None:
        return Target()
    if not isinstance(doc, dict):
        raise errors.InvalidSpec("must be an object with matchLabels and/or matchExpressions", field=field)
    allowed = {"matchLabels", "matchExpressions", *SELECTOR_EXTRAS, *(("exclude",) if not _nested else ())}
    unknown = set(doc) - allowed
    if unknown:
        raise errors.InvalidSpec(f"unknown fields {sorted(unknown)}; allowed are {sorted(allowed)}", field=field)
    requirements: list[Requirement] = []
    labels = doc.get("matchLabels")
    labels = {} if labels is None else labels
    if not isinstance(labels, dict):
        raise errors.InvalidSpec("must be an object of key: value strings", field=f"{field}.matchLabels")
    if len(labels) > MAX_LABELS:
        raise errors.InvalidSpec(f"{len(labels)} labels; the limit is {MAX_LABELS}", field=f"{field}.matchLabels")
    for key, value in sorted(labels.items()):
        where = f"{field}.matchLabels[{key!r}]"
        _check_key(key, field=where)
        _check_value(value, field=where)
        requirements.append(Requirement(key=key, operator=Operator.IN, values=frozenset((value,))))
    expressions = doc.get("matchExpressions")
    expressions = [] if expressions is None else expressions
    if not isinstance(expressions, list):
        raise errors.InvalidSpec("must be a list", field=f"{field}.matchExpressions")
    if len(expressions) > MAX_EXPRESSIONS:
        raise errors.InvalidSpec(
            f"{len(expressions)} expressions; the limit is {MAX_EXPRESSIONS}", field=f"{field}.matchExpressions"
        )
    normalized: dict[str, Any] = {}
    if labels:
        normalized["matchLabels"] = dict(sorted(labels.items()))
    parsed = [_parse_expression(expr, field=f"{field}.matchExpressions[{i}]") for i, expr in enumerate(expressions)]
    if parsed:
        normalized["matchExpressions"] = [
            {"key": r.key, "operator": r.operator.value, **({"values": sorted(r.values)} if r.values else {})}
            for r in parsed
        ]
    version_ranges = _parse_versions(doc.get("matchVersions"), field=f"{field}.matchVersions")
    if version_ranges:
        normalized["matchVersions"] = {k: str(r) for k, r in version_ranges}
    device_ids = _parse_device_ids(doc.get("deviceIds"), field=f"{field}.deviceIds")
    if device_ids is not None:
        normalized["deviceIds"] = sorted(device_ids)
    exclude: list[Target] = []
    raw_exclude = doc.get("exclude")
    if raw_exclude is not None:
        if not isinstance(raw_exclude, list):
            raise errors.InvalidSpec("must be a list of selectors", field=f"{field}.exclude")
        if len(raw_exclude) > MAX_EXCLUDES:
            raise errors.InvalidSpec(
                f"{len(raw_exclude)} selectors; the limit is {MAX_EXCLUDES}", field=f"{field}.exclude"
            )
        for i, sel in enumerate(raw_exclude):
            where = f"{field}.exclude[{i}]"
            parsed_sel = parse_target(sel, field=where, _nested=True)
            if parsed_sel.matches_everything:
                raise errors.InvalidSpec("an empty selector would exclude every device", field=where)
            exclude.append(parsed_sel)
        if exclude:
            normalized["exclude"] = [dict(e.document) for e in exclude]
    return Target(
        requirements=(*requirements, *parsed),
        document=normalized,
        versions=version_ranges,
        device_ids=device_ids,
        exclude=tuple(exclude),
    )


@functools.lru_cache(maxsize=1024)
def _parse_canonical(text: str) -> Target:
    return parse_target(json.loads(text))


def parse_stored(doc: Mapping[str, Any] | None) -> Target:
    """`parse_target` of a stored (already validated) document, cached: every Sync and status re-reads them."""
    return _parse_canonical(json.dumps(doc or {}, sort_keys=True, separators=(",", ":")))


def _parse_versions(doc: Any, *, field: str) -> tuple[tuple[str, versions_mod.VersionRange], ...]:
    if doc is None:
        return ()
    if not isinstance(doc, dict):
        raise errors.InvalidSpec("must be an object of attribute: version range", field=field)
    if len(doc) > MAX_LABELS:
        raise errors.InvalidSpec(f"{len(doc)} ranges; the limit is {MAX_LABELS}", field=field)
    out = []
    for key, text in sorted(doc.items()):
        where = f"{field}[{key!r}]"
        _check_key(key, field=where)
        out.append((key, versions_mod.parse_range(text, field=where)))
    return tuple(out)


def _parse_device_ids(doc: Any, *, field: str) -> frozenset[str] | None:
    if doc is None:
        return None
    if not isinstance(doc, list) or not doc:
        raise errors.InvalidSpec("must be a non-empty list of device ids", field=field)
    if len(doc) > MAX_DEVICE_IDS:
        raise errors.InvalidSpec(f"{len(doc)} device ids; the limit is {MAX_DEVICE_IDS}", field=field)
    for j, value in enumerate(doc):
        _check_value(value, field=f"{field}[{j}]")
    return frozenset(doc)


def _parse_expression(expr: Any, *, field: str) -> Requirement:
    if not isinstance(expr, dict):
        raise errors.InvalidSpec("must be an object with key, operator and values", field=field)
    unknown = set(expr) - {"key", "operator", "values"}
    if unknown:
        raise errors.InvalidSpec(f"unknown fields {sorted(unknown)}", field=field)
    key = expr.get("key")
    _check_key(key, field=f"{field}.key")
    raw_op = expr.get("operator")
    try:
        op = Operator(raw_op)
    except ValueError:
        allowed = ", ".join(o.value for o in Operator)
        raise errors.InvalidSpec(f"{raw_op!r} is not one of {allowed}", field=f"{field}.operator") from None
    values = expr.get("values")
    if values is None:
        values = []
    if not isinstance(values, list):
        raise errors.InvalidSpec("must be a list of strings", field=f"{field}.values")
    if len(values) > MAX_VALUES:
        raise errors.InvalidSpec(f"{len(values)} values; the limit is {MAX_VALUES}", field=f"{field}.values")
    for j, value in enumerate(values):
        _check_value(value, field=f"{field}.values[{j}]")
    if op in (Operator.IN, Operator.NOT_IN) and not values:
        raise errors.InvalidSpec(f"operator {op.value} needs at least one value", field=f"{field}.values")
    if op in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and values:
        raise errors.InvalidSpec(f"operator {op.value} takes no values", field=f"{field}.values")
    return Requirement(key=key, operator=op, values=frozenset(values))


def _check_key(key: Any, *, field: str) -> None:
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LEN or not KEY_RE.match(key):
        raise errors.InvalidSpec(
            f"key {key!r} must be 1-{MAX_KEY_LEN} characters of letters, digits and . _ / -", field=field
        )


def _check_value(value: Any, *, field: str) -> None:
    if not isinstance(value, str) or len(value) > MAX_VALUE_LEN:
        raise errors.InvalidSpec(f"value {value!r} must be a string of at most {MAX_VALUE_LEN} characters", field=field)
