"""Which devices a release targets: Kubernetes-style label selectors over device attributes.

A target document is
`{"matchLabels": {k: v}, "matchExpressions": [{"key", "operator", "values"}]}`
with operators In | NotIn | Exists | DoesNotExist; every clause must hold (AND).
An empty document targets every device.

Devices are seen as *facts*: each key maps to a set of values. Ordinary
attributes are single-valued; two pseudo attributes come from the registry:
`tether.io/backend` (every engine backend that really runs on the device, e.g.
"mnn/cpu", so `In` means "has any of") and `tether.io/device-id` (explicit
cohorts and exclusions by id). Because a typo such as "matchLabel" would
otherwise silently widen a target to the whole fleet, unknown fields are
refused rather than ignored.

Pure: no I/O. Validation raises `errors.InvalidSpec` naming the field.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from tether.common import errors

BACKEND_KEY = "tether.io/backend"
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

    def matches(self, facts: Facts) -> bool:
        return all(r.matches(facts) for r in self.requirements)

    @property
    def matches_everything(self) -> bool:
        return not self.requirements


def device_facts(*, device_id: str, attributes: Mapping[str, str], backends: Iterable[str] = ()) -> Facts:
    """The facts a target is evaluated against; pseudo attributes win over reported ones."""
    facts: dict[str, frozenset[str]] = {k: frozenset((v,)) for k, v in attributes.items()}
    facts[DEVICE_ID_KEY] = frozenset((device_id,))
    backend_set = frozenset(backends)
    if backend_set:
        facts[BACKEND_KEY] = backend_set
    else:
        facts.pop(BACKEND_KEY, None)
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


def parse_target(doc: Any, *, field: str = "target") -> Target:
    """Validate a target document; `errors.InvalidSpec` names the offending path."""
    if doc is None:
        return Target()
    if not isinstance(doc, dict):
        raise errors.InvalidSpec("must be an object with matchLabels and/or matchExpressions", field=field)
    unknown = set(doc) - {"matchLabels", "matchExpressions"}
    if unknown:
        raise errors.InvalidSpec(
            f"unknown fields {sorted(unknown)}; allowed are matchLabels and matchExpressions", field=field
        )
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
    return Target(requirements=(*requirements, *parsed), document=normalized)


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
